"""The batch job's outputs and their manifests: parts written atomically, a manifest per shard and one
over all shards.

    output/shard=00003-of-00008/part-00012.parquet
    output/shard=00003-of-00008/_manifest.json   job (model id, K, rules, input), per-part rows and sha256
    output/_manifest.json                        every shard's, written once all shards are complete

A part is written to a hidden temporary file, checksummed and renamed into place, and only then recorded
in the shard's manifest. A re-run of the same job keeps every recorded part whose sha256 still matches
and computes the others, so a killed job ends with exactly one row per shopper.
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.partition import Layout
from recsys.bundle import sha256_file
from recsys.data.schema import SHOPPER
from recsys.io import atomic_path, write_json

log = logging.getLogger(__name__)

FORMAT = "caddie-candidates"
FORMAT_VERSION = 2  # 2: the job's inputs are fingerprinted by content and the model by its full bundle id
MANIFEST_FILE = "_manifest.json"
SCHEMA = pa.schema(
    [
        pa.field(SHOPPER, pa.int64(), nullable=False),
        pa.field("product_ids", pa.list_(pa.int64())),
        pa.field("scores", pa.list_(pa.float32())),
        pa.field("fallback", pa.bool_()),
    ]
)


class CandidatesError(ValueError):
    """A job that cannot run as configured; the message names the setting or input at fault."""


def write_part(
    directory: Path, name: str, batches: list[pa.RecordBatch], schema: pa.Schema = SCHEMA
) -> dict[str, Any]:
    """Write a part atomically (hidden temporary file, then ``os.replace``); returns its manifest entry
    (its ``fallback`` rows: those of a ``fallback`` column, if the schema has one)."""
    table = pa.Table.from_batches(batches, schema=schema)
    with atomic_path(directory / name) as tmp:
        pq.write_table(table, tmp)
        fallback = pc.sum(table.column("fallback")).as_py() if "fallback" in schema.names else 0
        return {
            "rows": table.num_rows,
            "fallback": int(fallback or 0),
            "sha256": sha256_file(tmp),
            "bytes": tmp.stat().st_size,
        }


class ShardManifest:
    """The shard's ``_manifest.json``: the job, and each finished part (rewritten as each one lands)."""

    def __init__(
        self,
        directory: Path,
        job: dict[str, Any],
        shard: dict[str, int],
        overwrite: bool,
        kind: str = FORMAT,
    ) -> None:
        self.path, self.kind = directory / MANIFEST_FILE, kind
        self.job, self.shard = json.loads(json.dumps(job, default=str)), shard
        self.parts: dict[str, dict[str, Any]] = {}
        # left by a killed run; the shard's lock (batch.lock) guarantees no other run is writing them
        for stale in directory.glob(".*.tmp-*"):
            stale.unlink()
        try:
            previous = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except json.JSONDecodeError:  # e.g. lost in a crash of the machine: its parts are recomputed
            log.warning("%s is unreadable; recomputing every part of this shard", self.path)
            return
        same = (
            previous.get("format", FORMAT) == kind
            and previous.get("format_version") == FORMAT_VERSION
            and previous.get("job") == self.job
        )
        if same and previous.get("shard") == shard:
            # a recorded part counts only if its file is still the one that was recorded
            self.parts = {
                name: entry
                for name, entry in previous["parts"].items()
                if (directory / name).is_file() and sha256_file(directory / name) == entry["sha256"]
            }
        elif overwrite:
            shutil.rmtree(directory)
            directory.mkdir(parents=True)
        else:
            before = previous.get("job", {})
            changed = sorted(key for key in {*self.job, *before} if self.job.get(key) != before.get(key))
            raise CandidatesError(
                f"{directory} holds the output of another job (changed: {', '.join(changed) or 'shard'}); "
                "write to another output, or pass overwrite=true to replace this shard"
            )

    def record(self, name: str, entry: dict[str, Any]) -> None:
        self.parts[name] = entry
        self.save(complete=False)

    def save(self, complete: bool, **extra: Any) -> dict[str, Any]:
        manifest = {
            "format": self.kind,
            "format_version": FORMAT_VERSION,
            "job": self.job,
            "shard": self.shard,
            "complete": complete,
            "rows": sum(entry["rows"] for entry in self.parts.values()),
            "fallback_rows": sum(entry["fallback"] for entry in self.parts.values()),
            "parts": dict(sorted(self.parts.items())),
            "updated_at": datetime.now(timezone.utc).isoformat(),
            **extra,
        }
        write_json(self.path, manifest)
        return manifest


def combine_shards(
    output: Path, num_shards: int, job: dict[str, Any], kind: str = FORMAT
) -> dict[str, Any] | None:
    """Write ``output/_manifest.json`` over all shards if every one is complete (else return None).

    Any shard may be the last to finish, so each one tries; the content is the same whoever writes it.
    """
    shards = {}
    for index in range(num_shards):
        path = output / Layout(index, num_shards, 1).shard_name / MANIFEST_FILE
        if not path.exists():
            return None
        manifest = json.loads(path.read_text())
        if not manifest["complete"] or manifest["job"] != job:
            return None
        shards[path.parent.name] = {key: manifest[key] for key in ("rows", "fallback_rows", "parts")}
    combined = {
        "format": kind,
        "format_version": FORMAT_VERSION,
        "job": job,
        "num_shards": num_shards,
        "rows": sum(shard["rows"] for shard in shards.values()),
        "fallback_rows": sum(shard["fallback_rows"] for shard in shards.values()),
        "shards": shards,
    }
    write_json(output / MANIFEST_FILE, combined)
    return combined
