"""Serving limits: what the largest allowed request costs, and a bounded mixed load test. Loopback only.

    python -m benchmarks.serve_hardening sizing              # cost of batch x history x k shapes
    python -m benchmarks.serve_hardening load                # 10,000 mixed requests, 200 at once
    python -m benchmarks.serve_hardening load --requests 2000 --concurrency 50

Both start ``python -m serving`` as a subprocess on a free 127.0.0.1 port (never another interface) with
a synthetic bundle from ``tests/bundles.py`` (an ONNX weighted-mean encoder, a flat FAISS index and a
repeat-aware scorer, so requests with timestamps take the scorer's path), and stop it when done.

``sizing`` raises the server's limits and measures one request at a time, for each ``--shapes`` entry
(batch, history length, k; 13-digit product ids, all distinct, with timestamps, ``exclude_purchased`` and
100 explore slots: the costliest rules). Each shape gets a fresh server, so memory an earlier request
left in the allocator cannot hide the cost. The first send's peak RSS above the resident size just
before it is the memory figure (``/proc/<pid>/clear_refs`` resets the peak); ``--repeats`` more sends
give the median and maximum wall time at the client.

``load`` runs the server with its default limits and sends ``--requests`` requests from ``--concurrency``
closed-loop workers: small valid recommendations, the largest valid single and batch requests, and
malformed ones (bad JSON, wrong types, over a count or size limit, a body just under the byte limit that
is then refused, oversized bodies with and without a Content-Length). It is bounded twice: by the request
count and by ``--max-seconds``, after which what is left is cancelled. It reports answers by status code,
p50/p99 latency of the valid requests, the server's peak RSS (VmHWM) and ``/healthz`` latency, polled
every 50 ms from a separate process so the load generator's own GIL does not delay the probe. The load
generator shares the machine's cores with the server (``--client-nice`` lowers its priority). Figures:
BENCHMARKS.md, "Serving limits and hardening".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from benchmarks.serve_load import wait_ready
from serving.app import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BATCH_ITEMS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HISTORY,
    DEFAULT_MAX_K,
)
from tests.bundles import make_bundle
from tests.rankers import random_ranker

HOST = "127.0.0.1"  # hard-coded: this load test must never leave the machine
# sizing: the old defaults' largest requests, other shapes considered, and the new defaults' corners
SHAPES = [
    "1,1000,1000", "64,1000,1000", "1024,1000,1000",
    "64,1000,100", "64,156,100", "64,1,100", "32,312,100",
    "1,1000,100", "10,1000,100", "16,625,100", "16,1,100", "1,4000,100", "1,10000,100",
]  # fmt: skip


def build_bundle(path: Path, num_items: int, dim: int, max_len: int) -> tuple[Path, np.ndarray]:
    """A synthetic bundle with a ranker; its path and product ids."""
    bundle = make_bundle(path, num_items=num_items, dim=dim, max_len=max_len, repeat=random_ranker(num_items))
    return bundle.path, bundle.product_ids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def proc_status(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` memory line (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


@contextmanager
def server(bundle: Path, extra: list[str]) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m serving`` on a free loopback port; killed (its whole session) on the way out."""
    port = free_port()
    command = [sys.executable, "-m", "serving", "--bundle", str(bundle), "--host", HOST, "--port", str(port)]
    process = subprocess.Popen([*command, *extra, "--log-level", "warning"], start_new_session=True)
    base = f"http://{HOST}:{port}"
    try:
        wait_ready(base, process, 120)
        yield base, process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def shopper(rng: np.random.Generator, product_ids: np.ndarray, length: int, k: int, worst: bool) -> dict:
    """One /recommend body: ``length`` products (distinct when ``worst``) with timestamps."""
    if worst:
        history = rng.choice(product_ids, size=min(length, len(product_ids)), replace=False)
    else:
        history = product_ids[(rng.zipf(1.3, size=length) - 1) % len(product_ids)]
    stamps = np.sort(1_700_000_000 + rng.uniform(0, 3e7, size=len(history))).round(3)
    body = {"history": history.tolist(), "timestamps": stamps.tolist(), "k": k}
    if worst:
        body |= {"exclude_purchased": True, "explore_slots": 100}
    return body


# -------------------------------------------------------------------------------------------- sizing


def sizing(args: argparse.Namespace, bundle: Path, product_ids: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    longest = max([4096, *(int(shape.split(",")[1]) for shape in args.shapes)])
    limits = ["--max-batch", "4096", "--max-history", str(longest), "--max-k", "4096"]
    limits += ["--max-batch-items", str(1 << 30), "--max-body-bytes", str(1 << 30), "--body-timeout", "120"]
    header = ("batch", "history", "k", "entries", "body MB", "p50 ms", "max ms", "peak MiB")
    print(" ".join(f"{h:>9}" for h in header), flush=True)
    for shape in args.shapes:
        batch, history, k = (int(v) for v in shape.split(","))
        one = [shopper(rng, product_ids, history, k, worst=True) for _ in range(batch)]
        url, body = ("/recommend", one[0]) if batch == 1 else ("/recommend/batch", {"requests": one})
        content = json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        # A fresh server per shape: memory a previous request left in the allocator would hide the cost.
        with server(bundle, limits) as (base, process), httpx.Client(base_url=base, timeout=300) as client:
            client.post("/recommend", json={"history": product_ids[:5].tolist(), "k": 5})  # lazy setup
            before = proc_status(process.pid, "VmRSS")
            Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
            seconds = []
            for _ in range(args.repeats + 1):  # the first is the cold one measured for memory
                start = time.perf_counter()
                response = client.post(url, content=content, headers=headers)
                seconds.append(time.perf_counter() - start)
                assert response.status_code == 200, response.text[:300]
                if len(seconds) == 1:
                    peak = proc_status(process.pid, "VmHWM") - before
        row = (batch, history, k, batch * history, f"{len(content) / 1e6:.2f}")
        row += (f"{np.median(seconds[1:]) * 1e3:.1f}", f"{max(seconds[1:]) * 1e3:.1f}", f"{peak / 2**20:.1f}")
        print(" ".join(f"{v:>9}" for v in row), flush=True)


# ---------------------------------------------------------------------------------------------- load


@dataclass
class Kind:
    """One kind of request in the mix: a name, its share, a URL, ready bytes, and whether it is valid."""

    name: str
    share: float
    url: str
    bodies: list[bytes | None]  # None: an oversized body sent chunked, generated at send time
    valid: bool
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})


def request_mix(product_ids: np.ndarray) -> list[Kind]:
    """The load test's requests, sized by the server's default limits (imported, so they stay in step)."""
    rng = np.random.default_rng(2)
    per = DEFAULT_MAX_BATCH_ITEMS // DEFAULT_MAX_BATCH

    def encoded(body: object) -> bytes:
        return json.dumps(body).encode()

    def batch(length: int, count: int = DEFAULT_MAX_BATCH) -> bytes:
        return encoded(
            {"requests": [shopper(rng, product_ids, length, DEFAULT_MAX_K, True) for _ in range(count)]}
        )

    small = [encoded(shopper(rng, product_ids, int(n), 10, worst=False)) for n in rng.integers(1, 60, 200)]
    single_max = [
        encoded(shopper(rng, product_ids, DEFAULT_MAX_HISTORY, DEFAULT_MAX_K, True)) for _ in range(4)
    ]
    batch_max = [batch(per) for _ in range(3)]
    malformed = [b'{"history": [1,', b"", b"\xff\xfe{}", b"[" * 50_000, b'{"history": [1], "k": NaN}', b"nul"]
    wrong_types = [
        encoded(b)
        for b in [{"history": "123"}, {"history": [1], "k": "3"}, {"history": [1.5]}, [1, 2], {"k": 3}, None]
    ]
    over_limits = [
        encoded({"requests": [{"history": [1]}] * (DEFAULT_MAX_BATCH + 1)}),
        batch(per + 1),
        encoded({"history": [1] * (DEFAULT_MAX_HISTORY + 1)}),
        encoded({"history": [1], "k": DEFAULT_MAX_K + 1}),
    ]
    # the costliest invalid request: a body just under the byte limit, parsed in full, then refused
    largest_invalid = [b'{"history": [' + b"1000000000001," * ((DEFAULT_MAX_BODY_BYTES - 100) // 14) + b"1]}"]
    oversized = [b'{"history": [' + b"1000000000001," * (DEFAULT_MAX_BODY_BYTES // 14 + 1000) + b"1]}"]
    assert (
        all(len(b) < DEFAULT_MAX_BODY_BYTES for b in batch_max + largest_invalid)
        and len(oversized[0]) > DEFAULT_MAX_BODY_BYTES
    )
    return [
        Kind("small valid", 0.55, "/recommend", small, True),
        Kind("largest single", 0.07, "/recommend", single_max, True),
        Kind("largest batch", 0.03, "/recommend/batch", batch_max, True),
        Kind("malformed JSON", 0.08, "/recommend", malformed, False),
        Kind("wrong types", 0.08, "/recommend", wrong_types, False),
        Kind("over a count limit", 0.06, "/recommend/batch", over_limits[:2], False),
        Kind("over a size limit", 0.03, "/recommend", over_limits[2:], False),
        Kind("largest invalid (1 MiB)", 0.02, "/recommend", largest_invalid, False),
        Kind("oversized, Content-Length", 0.04, "/recommend", oversized, False),
        Kind("oversized, chunked", 0.04, "/recommend/batch", [None], False),
    ]


async def chunked_oversized() -> AsyncIterator[bytes]:
    """A body with no declared length, 64 KiB chunks, 3 MiB in all: three times the limit."""
    chunk = b"1000000000001," * (65536 // 14)
    yield b'{"requests": [{"history": ['
    for _ in range(3 * 1024 * 1024 // len(chunk)):
        yield chunk
    yield b"1]}]}"


def health_poller(base: str, stop: multiprocessing.synchronize.Event, out: multiprocessing.Queue) -> None:
    """In its own process: GET /healthz every 50 ms; puts ([latency s], failures) when ``stop`` is set."""
    latencies, failures = [], 0
    with httpx.Client(base_url=base, timeout=2) as client:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                ok = client.get("/healthz").status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            failures += not ok
            time.sleep(0.05)
    out.put((latencies, failures))


async def drive(base: str, kinds: list[Kind], count: int, concurrency: int, max_seconds: float) -> dict:
    rng = np.random.default_rng(3)
    plan = rng.choice(
        len(kinds), size=count, p=np.array([k.share for k in kinds]) / sum(k.share for k in kinds)
    )
    queue: asyncio.Queue[int] = asyncio.Queue()
    for kind in plan.tolist():
        queue.put_nowait(kind)
    statuses: dict[str, Counter] = {k.name: Counter() for k in kinds}
    latencies: dict[str, list[float]] = {k.name: [] for k in kinds if k.valid}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def worker(seed: int) -> None:
            pick = np.random.default_rng(seed)
            while True:
                try:
                    kind = kinds[queue.get_nowait()]
                except asyncio.QueueEmpty:
                    return
                body = kind.bodies[int(pick.integers(len(kind.bodies)))]
                content = chunked_oversized() if body is None else body
                start = time.perf_counter()
                try:
                    response = await client.post(kind.url, content=content, headers=kind.headers)
                    status = str(response.status_code)
                except httpx.HTTPError as error:
                    status = type(error).__name__
                elapsed = time.perf_counter() - start
                statuses[kind.name][status] += 1
                if kind.valid and status == "200":
                    latencies[kind.name].append(elapsed)

        tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        start = time.perf_counter()
        _, pending = await asyncio.wait(tasks, timeout=max_seconds)
        for task in pending:  # the time bound: whatever is left is dropped, and said so
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return {
        "statuses": statuses,
        "latencies": latencies,
        "elapsed": time.perf_counter() - start,
        "unsent": queue.qsize(),
        "cut": bool(pending),
    }


def load(args: argparse.Namespace, bundle: Path, product_ids: np.ndarray) -> None:
    kinds = request_mix(product_ids)
    with server(bundle, args.server_args) as (base, process):
        baseline = proc_status(process.pid, "VmRSS")
        spawn = multiprocessing.get_context("spawn")  # a clean interpreter: no forked OpenMP/ONNX state
        stop, out = spawn.Event(), spawn.Queue()
        poller = spawn.Process(target=health_poller, args=(base, stop, out))
        poller.start()
        if args.client_nice:  # after the server and the poller started: only this process is lowered
            os.nice(args.client_nice)
        try:
            result = asyncio.run(drive(base, kinds, args.requests, args.concurrency, args.max_seconds))
        finally:
            stop.set()
            health, health_failures = out.get(timeout=30)
            poller.join(timeout=10)
        peak = proc_status(process.pid, "VmHWM")
        alive = httpx.get(f"{base}/healthz", timeout=2).status_code == 200

    sent = sum(sum(c.values()) for c in result["statuses"].values())
    print(
        f"{sent} requests in {result['elapsed']:.1f} s ({sent / result['elapsed']:.0f}/s), concurrency "
        f"{args.concurrency}; {result['unsent']} unsent{' (time bound hit)' if result['cut'] else ''}"
    )
    total: Counter = Counter()
    for kind in kinds:
        counts = result["statuses"][kind.name]
        total += counts
        line = ", ".join(f"{status}: {n}" for status, n in sorted(counts.items()))
        if kind.valid and result["latencies"][kind.name]:
            ms = np.array(result["latencies"][kind.name]) * 1e3
            line += f"   200s p50 {np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms"
        print(f"  {kind.name:<27} {line}")
    print(f"  {'all':<27} {', '.join(f'{s}: {n}' for s, n in sorted(total.items()))}")
    server_errors = sum(n for s, n in total.items() if s.startswith("5") and s != "503")
    shed = total.get("503", 0)
    h = np.array(health) * 1e3
    print(f"server RSS: {baseline / 2**20:.0f} MiB at start, peak (VmHWM) {peak / 2**20:.0f} MiB")
    print(
        f"/healthz: {len(h)} polls, p50 {np.percentile(h, 50):.1f} ms, p99 {np.percentile(h, 99):.1f} ms, "
        f"max {h.max():.1f} ms, {health_failures} failed, {int((h > 100).sum())} over 100 ms"
    )
    print(f"/healthz after the run: {'ok' if alive else 'FAILED'}")
    goals = {
        "no 5xx other than the 503 load shedding": server_errors == 0,
        "no transport errors": all(s.isdigit() for s in total),
        "peak RSS < 1 GB": peak < 1e9,
        "healthz < 100 ms throughout": len(h) > 0 and h.max() < 100 and health_failures == 0,
    }
    print(f"503 (shed by the concurrency limit, with Retry-After): {shed}")
    for goal, met in goals.items():
        print(f"  {'met    ' if met else 'MISSED '} {goal}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["sizing", "load"])
    parser.add_argument("--items", type=int, default=30_000, help="catalogue size of the synthetic bundle")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=SHAPES,
        help="sizing: batch,history,k triples (every history with timestamps and the costliest rules)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="sizing: timed requests per shape")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="hard bound on the load phase")
    parser.add_argument(
        "--client-nice",
        type=int,
        default=0,
        help="load: lower the load generator's CPU priority by this much (it shares the server's cores)",
    )
    parser.add_argument(
        "--server-args", nargs=argparse.REMAINDER, default=[], help="passed to python -m serving (last)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="caddie-hardening-") as tmp:
        bundle, product_ids = build_bundle(Path(tmp) / "bundle", args.items, args.dim, args.max_len)
        (sizing if args.mode == "sizing" else load)(args, bundle, product_ids)


if __name__ == "__main__":
    main()
