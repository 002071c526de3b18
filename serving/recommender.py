"""Online recommendations from a bundle: ONNX Runtime encodes histories, FAISS searches, one scorer selects.

No torch anywhere on this path (a subprocess test checks ``sys.modules``): production installs carry
numpy, pyarrow, faiss and onnxruntime only.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import faiss
import numpy as np
import onnxruntime as ort
import pyarrow as pa

from recsys.bundle import INPUT_NAME, MODEL_FILE, OUTPUT_NAME, Bundle, BundleError, bundle_id, read_bundle
from recsys.data.sequences import FIRST_PURCHASE, MICROSECONDS_PER_DAY, purchase_gaps
from recsys.data.vocabulary import NUM_RESERVED, PAD
from recsys.repeat import SECONDS_PER_DAY, Histories
from recsys.scoring import candidates_needed, popularity_order, select

T = TypeVar("T")


@dataclass(frozen=True)
class Recommendation:
    """One shopper's recommendations, best first.

    ``scores`` are, with ``repeat_aware``, the probability that the product is in the shopper's next basket
    (the bundle's repeat-aware scorer, given purchase times); else model scores (inner products); with
    ``fallback`` the products' popularity counts. ``unknown`` counts history entries outside the catalogue
    (dropped); ``truncated`` says only the most recent ``max_len`` known products were encoded.
    """

    product_ids: list[int]
    scores: list[float]
    fallback: bool
    unknown: int
    truncated: bool
    repeat_aware: bool = False


def _gaps(seconds: np.ndarray) -> np.ndarray:
    """``purchase_gaps`` of one history's purchase times in seconds, in the batch job's integer
    microseconds, so both read the same bucket at a bucket's edge."""
    micros = np.round(seconds * 1e6).astype(np.int64)
    return purchase_gaps(micros, np.array([0, len(micros)]), MICROSECONDS_PER_DAY)


def _groups(keys: Iterable[Hashable]) -> list[tuple[Any, np.ndarray]]:
    """(key, positions) of each distinct key, in order of first appearance."""
    positions: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        positions.setdefault(key, []).append(i)
    return [(key, np.array(found)) for key, found in positions.items()]


def _per_request(value: T | Sequence[T], count: int, name: str) -> list[T]:
    """A scalar repeated ``count`` times, or a sequence checked to have ``count`` entries."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} histories")
        return list(value)
    return [value] * count  # type: ignore[list-item]


class Recommender:
    """A loaded, verified bundle ready to answer requests; immutable, so safe to share across threads."""

    def __init__(self, bundle: Bundle, session: ort.InferenceSession, search_threads: int = 1) -> None:
        self._bundle = bundle
        self._session = session
        self._search_threads = search_threads
        self._input = bundle.manifest.get("input_name", INPUT_NAME)
        self._gaps = bundle.gaps_name
        self._output = bundle.manifest.get("output_name", OUTPUT_NAME)
        self._product_ids = bundle.product_ids.astype(np.int64)
        popularity = bundle.items.column("popularity").to_numpy()
        self._popularity = popularity.astype(np.float64)
        # Vectorised product id -> row lookup: binary search over the sorted ids.
        self._sort = np.argsort(self._product_ids, kind="stable")
        self._sorted_ids = self._product_ids[self._sort]
        if np.any(self._sorted_ids[1:] == self._sorted_ids[:-1]):
            raise BundleError("items.parquet has duplicate product_id values")
        self._popular = popularity_order(self._product_ids, self._popularity)
        self._bundle_id = bundle_id(bundle.manifest)

    @classmethod
    def load(cls, path: str | Path, intra_op_threads: int = 1, search_threads: int = 1) -> Recommender:
        """Read and verify the bundle at ``path`` (format, checksums), load the model and probe it once.

        ``intra_op_threads`` are ONNX Runtime's threads per encode, ``search_threads`` FAISS's OpenMP
        threads per search (one of each suits single requests; batches gain from more). Anything wrong
        raises :class:`BundleError` naming the file, so a hot reload can refuse the bundle before it
        replaces a working one.
        """
        bundle = read_bundle(path)
        if bundle.index.ntotal < 1:
            raise BundleError(f"{path} has no items")
        max_len = bundle.manifest.get("max_len")
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
            raise BundleError(f"bundle.json has max_len {max_len!r}; expected a positive integer")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning intra-op workers would burn cores between requests that FAISS and the server need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(
                bundle.model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises several unrelated pybind exception types
            raise BundleError(f"{MODEL_FILE} cannot be loaded by onnxruntime: {error}") from error
        recommender = cls(bundle, session, search_threads)
        recommender.check()
        return recommender

    def check(self) -> None:
        """Recommend for a one-item history end to end (at load, and for readiness probes).

        Raises :class:`BundleError` if the model's inputs, output shape or values do not fit the bundle.
        """
        names = [i.name for i in self._session.get_inputs()]
        expected = [self._input] if self._gaps is None else [self._input, self._gaps]
        if sorted(names) != sorted(expected):
            raise BundleError(f"{MODEL_FILE} has inputs {names}, the manifest names {expected}")
        try:
            (out,) = self._session.run([self._output], self._feeds(np.full((1, 1), NUM_RESERVED, np.int64)))
        except Exception as error:  # as above: onnxruntime's exception types are not one hierarchy
            raise BundleError(f"{MODEL_FILE} failed a probe run: {error}") from error
        if out.shape != (1, self.dim) or not np.isfinite(out).all():
            raise BundleError(
                f"{MODEL_FILE} returned {out.shape} embeddings, expected finite (1, {self.dim})"
            )
        self.recommend([int(self._product_ids[0])], k=1, timestamps=[0.0])

    def _feeds(self, item_ids: np.ndarray, gaps: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The model's inputs: item ids, plus for a basket-aware model their gaps (first purchases if
        None, as for the load probe)."""
        if self._gaps is None:
            return {self._input: item_ids}
        if gaps is None:
            gaps = np.where(item_ids == PAD, 0.0, FIRST_PURCHASE).astype(np.float32)
        return {self._input: item_ids, self._gaps: gaps}

    @property
    def needs_timestamps(self) -> bool:
        """Whether the model is basket-aware: it reads purchase gaps, so requests must carry timestamps."""
        return self._gaps is not None

    @property
    def metadata(self) -> dict[str, Any]:
        """The bundle's manifest (format, model, sizes, metrics, library versions, checksums)."""
        return json.loads(json.dumps(self._bundle.manifest))  # a deep copy callers may not mutate back

    @property
    def bundle_id(self) -> str:
        """Short content id of the bundle's files: equal bundles share it, a new model changes it."""
        return self._bundle_id

    @property
    def path(self) -> Path:
        return self._bundle.path

    @property
    def max_len(self) -> int:
        return self._bundle.max_len

    @property
    def dim(self) -> int:
        return self._bundle.dim

    @property
    def num_items(self) -> int:
        return len(self._product_ids)

    @property
    def items(self) -> pa.Table:
        """The catalogue: ``product_id``, ``popularity`` and whatever metadata the bundle carries."""
        return self._bundle.items

    def rows_of(self, product_ids: np.ndarray) -> np.ndarray:
        """Item rows of ``product_ids`` (int64), ``-1`` for products outside the catalogue."""
        product_ids = np.asarray(product_ids, dtype=np.int64)
        position = np.searchsorted(self._sorted_ids, product_ids).clip(max=len(self._sorted_ids) - 1)
        found = self._sorted_ids[position] == product_ids
        return np.where(found, self._sort[position], -1)

    def recommend(
        self,
        history: Sequence[int],
        k: int = 10,
        exclude_purchased: bool = False,
        min_score: float | None = None,
        timestamps: Sequence[float] | None = None,
        explore_slots: int = 0,
    ) -> Recommendation:
        """Top ``k`` products for a shopper whose purchases (product ids, oldest first) are ``history``.

        ``timestamps`` (seconds since the epoch, one per history entry, oldest first; a basket's products
        share one) turn on the bundle's repeat-aware scorer if it has one: scores become next-basket
        probabilities from the shopper's own purchase pattern and the model's new-product candidates.
        Without them, or without a scorer in the bundle, products rank by model score (``repeat_aware`` is
        False). A basket-aware model (:attr:`needs_timestamps`) reads the gaps between them, and a
        non-empty history without them is an error.

        Unknown products are dropped and counted; only the most recent ``max_len`` known ones are encoded.
        An empty or all-unknown history gets the popularity fallback (flagged; ``min_score`` does not
        apply to it). ``min_score`` otherwise drops lower-scoring items, so fewer (or zero) may come back;
        ``exclude_purchased`` never recommends a product of the history; ``explore_slots`` reserves that
        many of the ``k`` positions for the best products new to the shopper (the batch job's rule, by the
        same ``recsys.scoring.select``), so a shopper is not shown only what they already buy.
        """
        (result,) = self.recommend_batch(
            [history], k, exclude_purchased, min_score, [timestamps], explore_slots
        )
        return result

    def recommend_batch(
        self,
        histories: Sequence[Sequence[int]],
        k: int | Sequence[int] = 10,
        exclude_purchased: bool | Sequence[bool] = False,
        min_score: float | Sequence[float | None] | None = None,
        timestamps: Sequence[Sequence[float] | None] | None = None,
        explore_slots: int | Sequence[int] = 0,
    ) -> list[Recommendation]:
        """:meth:`recommend` for many shoppers with one ONNX run and one FAISS search.

        ``k``, ``exclude_purchased``, ``min_score`` and ``explore_slots`` are either shared or given per
        history; ``timestamps`` holds one list (or None) per history.
        """
        count = len(histories)
        ks = _per_request(k, count, "k")
        excludes = _per_request(exclude_purchased, count, "exclude_purchased")
        floors = _per_request(min_score, count, "min_score")
        explores = _per_request(explore_slots, count, "explore_slots")
        stamps = [None] * count if timestamps is None else list(timestamps)
        if len(stamps) != count:
            raise ValueError(f"timestamps has {len(stamps)} entries for {count} histories")
        if any(value < 1 for value in ks):
            raise ValueError("k must be >= 1")
        if any(value < 0 for value in explores):
            raise ValueError("explore_slots must be >= 0")

        lengths = [len(h) for h in histories]
        flat = np.fromiter(itertools.chain.from_iterable(histories), dtype=np.int64, count=sum(lengths))
        found = np.split(self.rows_of(flat), np.cumsum(lengths)[:-1]) if count else []
        known = [rows[rows >= 0] for rows in found]
        seconds = [self._seconds(found[i], stamps[i], lengths[i]) for i in range(count)]
        if self._gaps is not None:
            lacking = [i for i in range(count) if seconds[i] is None and len(known[i])]
            if lacking:
                raise ValueError(
                    f"this bundle's model is basket-aware: history {lacking[0]} needs timestamps "
                    "(one per entry)"
                )

        results: list[Recommendation | None] = [None] * count
        encoded = []
        for i, rows in enumerate(known):
            if len(rows):
                encoded.append(i)
            else:
                top = self._popular[: ks[i]]
                results[i] = Recommendation(
                    self._product_ids[top].tolist(), self._popularity[top].tolist(), True, lengths[i], False
                )
        if encoded:
            top_rows, top_scores, aware = self._search(
                [known[i] for i in encoded],
                [ks[i] for i in encoded],
                [excludes[i] for i in encoded],
                [floors[i] for i in encoded],
                [explores[i] for i in encoded],
                [seconds[i] for i in encoded],
            )
            for j, i in enumerate(encoded):
                rows, scores = top_rows[j, : ks[i]], top_scores[j, : ks[i]]
                hit = rows >= 0
                results[i] = Recommendation(
                    self._product_ids[rows[hit]].tolist(),
                    scores[hit].tolist(),
                    False,
                    lengths[i] - len(known[i]),
                    len(known[i]) > self.max_len,
                    bool(aware[j]),
                )
        return results  # type: ignore[return-value]

    def _seconds(
        self, rows: np.ndarray, timestamps: Sequence[float] | None, length: int
    ) -> np.ndarray | None:
        """Purchase times (seconds) of a history's known entries, if given and the bundle can use them."""
        if timestamps is None or (self._bundle.repeat is None and self._gaps is None):
            return None
        seconds = np.asarray(timestamps, dtype=np.float64)
        if seconds.shape != (length,) or not np.isfinite(seconds).all():
            raise ValueError(f"timestamps need one finite number per history entry ({length})")
        if np.any(np.diff(seconds) < 0):
            raise ValueError("timestamps must be oldest first, as the history is")
        return seconds[rows >= 0]

    def _search(
        self,
        known: list[np.ndarray],
        ks: list[int],
        excludes: list[bool],
        floors: list[float | None],
        explores: list[int],
        seconds: list[np.ndarray | None],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Encode non-empty row histories in one batch and select the top ``max(ks)`` rows of each.

        Histories with ``seconds`` are scored by the repeat-aware scorer if the bundle has one; returns rows,
        scores and [B] which.
        """
        # Left-pad to the longest history kept; positions past max_len would make ONNX Runtime read the
        # position table out of range (silently wrong), so only the most recent max_len rows go in.
        kept = [rows[-self.max_len :] for rows in known]
        item_ids = np.full((len(kept), max(len(rows) for rows in kept)), PAD, dtype=np.int64)
        gaps = np.zeros(item_ids.shape, dtype=np.float32)
        for j, rows in enumerate(kept):
            item_ids[j, item_ids.shape[1] - len(rows) :] = rows + NUM_RESERVED
            if self._gaps is not None:  # gaps over the whole known history, then its most recent rows
                history_gaps = _gaps(seconds[j])  # type: ignore[arg-type]
                gaps[j, gaps.shape[1] - len(rows) :] = history_gaps[len(history_gaps) - len(rows) :]
        (shoppers,) = self._session.run([self._output], self._feeds(item_ids, gaps))

        bought = [np.unique(rows) for rows in known]
        exclude = [rows if flag else rows[:0] for rows, flag in zip(bought, excludes, strict=True)]
        k = max(ks)
        aware = np.array([t is not None and self._bundle.repeat is not None for t in seconds])
        # the history matters to the search size for repeat-aware scoring and explore slots only
        distinct = [len(b) if a or e else 0 for b, a, e in zip(bought, aware, explores, strict=True)]
        needed = candidates_needed(k, [len(e) for e in exclude], distinct, max(explores), repeat_aware=True)
        wanted = min(self.num_items, needed)
        # OpenMP's thread count is per calling thread: server worker threads would otherwise start at one
        # per core, and an OpenMP team per single-query search is slower, badly so on a loaded machine.
        faiss.omp_set_num_threads(self._search_threads)
        scores, rows = self._bundle.index.search(np.ascontiguousarray(shoppers, dtype=np.float32), wanted)
        floor = np.array([np.nan if f is None else f for f in floors], dtype=np.float64)
        out_rows, out_scores = (
            np.full((len(known), k), -1, np.int64),
            np.full((len(known), k), np.nan, np.float32),
        )
        # one select per (scorer, k): explore slots are reserved within each shopper's own k
        for (repeat_aware, group_k), group in _groups(zip(aware.tolist(), ks, strict=True)):
            group_rows, group_scores = rows[group], scores[group]
            if repeat_aware:
                assert self._bundle.repeat is not None
                days = [seconds[j] / SECONDS_PER_DAY for j in group]  # type: ignore[operator]
                histories = Histories.from_lists([known[j] for j in group], days)
                group_rows, group_scores = self._bundle.repeat.blend(
                    histories, group_rows, group_scores, group_k
                )
            out_rows[group, :group_k], out_scores[group, :group_k] = select(
                group_rows,
                group_scores,
                group_k,
                exclude=[exclude[j] for j in group],
                min_score=floor[group],
                history=[bought[j] for j in group],
                explore_slots=np.asarray(explores)[group],
            )
        return out_rows, out_scores, aware
