"""Online recommendations from a bundle: ONNX Runtime encodes histories, FAISS searches, one scorer selects.

No torch anywhere on this path (a subprocess test checks ``sys.modules``): production installs carry
numpy, pyarrow, faiss and onnxruntime only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort
import pyarrow as pa

from recsys.bundle import MODEL_FILE, Bundle, BundleError, onnx_session, read_bundle
from recsys.data.vocabulary import Vocabulary
from recsys.inputs import Histories
from recsys.rules import Rules
from recsys.scoring import popularity_order, recommend, search_size

SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class Recommendation:
    """One shopper's recommendations, best first.

    ``scores`` are, with ``repeat_aware``, the probability that the product is in the shopper's next basket
    (the bundle's repeat-aware scorer, given purchase times; a ranker with a ``size_prior`` lists them by
    probability times the shopper's basket-size factor, so they need not descend); else model scores
    (inner products); with
    ``fallback`` the products' popularity counts. ``unknown`` counts history entries outside the catalogue
    (dropped); ``truncated`` says only the most recent ``max_len`` known products were encoded.
    """

    product_ids: list[int]
    scores: list[float]
    fallback: bool
    unknown: int
    truncated: bool
    repeat_aware: bool = False


class Recommender:
    """A loaded, verified bundle ready to answer requests; immutable, so safe to share across threads."""

    def __init__(self, bundle: Bundle, session: ort.InferenceSession, search_threads: int = 1) -> None:
        self._bundle = bundle
        self._session = session
        self._search_threads = search_threads
        popularity = bundle.items.column("popularity").to_numpy()
        self._vocab = Vocabulary(bundle.product_ids.astype(np.int64), popularity.astype(np.int64))
        self._popularity = popularity.astype(np.float64)
        self._popular = popularity_order(self._vocab.product_ids, self._popularity)

    @classmethod
    def load(cls, path: str | Path, intra_op_threads: int = 1, search_threads: int = 1) -> Recommender:
        """Read and verify the bundle at ``path`` (format, manifest values, checksums), build the model's
        session from the verified bytes and probe it with the longest history the bundle allows.

        ``intra_op_threads`` are ONNX Runtime's threads per encode, ``search_threads`` FAISS's OpenMP
        threads per search (one of each suits single requests; batches gain from more). Anything wrong
        raises :class:`BundleError` naming the problem, so a hot reload can refuse the bundle before it
        replaces a working one.
        """
        bundle = read_bundle(path)
        recommender = cls(bundle, onnx_session(bundle, intra_op_threads), search_threads)
        recommender.check()
        return recommender

    def check(self) -> None:
        """Recommend for the longest history the bundle allows, end to end (at load, and for readiness).

        Raises :class:`BundleError` if the model's inputs, output shape or values do not fit the manifest
        (for instance a ``max_len`` the model's position table does not cover).
        """
        names = [i.name for i in self._session.get_inputs()]
        expected = [self._bundle.manifest["input_name"]]
        if self._bundle.gaps_name is not None:
            expected.append(self._bundle.gaps_name)
        if sorted(names) != sorted(expected):
            raise BundleError(f"{MODEL_FILE} has inputs {names}, the manifest names {expected}")
        # the most popular products, a day apart: every position of the model and the scorer's features
        count = self.max_len
        history = self._vocab.product_ids[self._popular[np.arange(count) % self.num_items]].tolist()
        stamps = (np.arange(count, dtype=np.float64) * SECONDS_PER_DAY).tolist()
        probe = Histories.from_requests(self._vocab, [history], [stamps])
        try:
            (out,) = self._session.run([self._output], self._feeds(*probe.model_inputs(self.max_len)))
        except Exception as error:  # onnxruntime's exception types are not one hierarchy
            raise BundleError(f"{MODEL_FILE} failed a probe of a {count}-product history: {error}") from error
        if out.shape != (1, self.dim) or not np.isfinite(out).all():
            raise BundleError(
                f"{MODEL_FILE} returned {out.shape} embeddings, expected finite (1, {self.dim})"
            )
        try:
            self.recommend(history, Rules(k=1), timestamps=stamps)
        except Exception as error:  # FAISS and the scorer fail in their own ways on a bundle that is off
            raise BundleError(f"the bundle failed a probe recommendation: {error!r}") from error

    @property
    def _output(self) -> str:
        return self._bundle.manifest["output_name"]

    def _feeds(self, item_ids: np.ndarray, gap_days: np.ndarray) -> dict[str, np.ndarray]:
        """The model's inputs: item ids, plus their gaps for a basket-aware model."""
        feeds = {self._bundle.manifest["input_name"]: item_ids}
        if self._bundle.gaps_name is not None:
            feeds[self._bundle.gaps_name] = gap_days
        return feeds

    @property
    def needs_timestamps(self) -> bool:
        """Whether the model is basket-aware: it reads purchase gaps, so requests must carry timestamps."""
        return self._bundle.gaps_name is not None

    @property
    def metadata(self) -> dict[str, Any]:
        """The bundle's manifest (format, model, sizes, metrics, library versions, checksums)."""
        return json.loads(json.dumps(self._bundle.manifest))  # a deep copy callers may not mutate back

    @property
    def bundle_id(self) -> str:
        """Short content id of the bundle (its manifest, which holds every file's sha256)."""
        return self._bundle.bundle_id

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
        return self._vocab.num_products

    @property
    def items(self) -> pa.Table:
        """The catalogue: ``product_id``, ``popularity`` and whatever metadata the bundle carries."""
        return self._bundle.items

    def rows_of(self, product_ids: np.ndarray) -> np.ndarray:
        """Item rows of ``product_ids`` (int64), ``-1`` for products outside the catalogue."""
        return self._vocab.rows(product_ids)

    def recommend(
        self, history: Sequence[int], rules: Rules | None = None, timestamps: Sequence[float] | None = None
    ) -> Recommendation:
        """Top ``rules.k`` products for a shopper whose purchases (product ids, oldest first) are ``history``.

        ``timestamps`` (seconds since the epoch, one per history entry, oldest first; a basket's products
        share one) turn on the bundle's repeat-aware scorer if it has one (and ``rules.repeat_aware``):
        scores become next-basket probabilities from the shopper's own purchase pattern and the model's
        new-product candidates. Without them, or without a scorer in the bundle, products rank by model
        score (``repeat_aware`` is False). A basket-aware model (:attr:`needs_timestamps`) reads the gaps
        between them, and a non-empty history without them is an error.

        Unknown products are dropped and counted; only the most recent ``max_len`` known ones are encoded.
        An empty or all-unknown history gets the popularity fallback (flagged; ``min_score`` does not
        apply to it). The other rules (``recsys.rules.Rules``) are applied by the one scorer the batch job
        and training's metrics use, :func:`recsys.scoring.recommend`; the first ``k`` products of a longer
        list are the list of ``k``.
        """
        (result,) = self.recommend_batch([history], rules or Rules(), [timestamps])
        return result

    def recommend_batch(
        self,
        histories: Sequence[Sequence[int]],
        rules: Rules | Sequence[Rules] | None = None,
        timestamps: Sequence[Sequence[float] | None] | None = None,
    ) -> list[Recommendation]:
        """:meth:`recommend` for many shoppers with one ONNX run and one FAISS search.

        ``rules`` are shared, or one per history; ``timestamps`` holds one list (or None) per history.
        """
        shoppers = Histories.from_requests(self._vocab, histories, timestamps)
        every = rules or Rules()
        if not isinstance(every, Rules) and len(every) != shoppers.num_shoppers:
            raise ValueError(f"{len(every)} rules for {shoppers.num_shoppers} histories")
        if self.needs_timestamps:
            lacking = np.flatnonzero(~shoppers.timed & (shoppers.lengths > 0))
            if len(lacking):
                raise ValueError(
                    f"this bundle's model is basket-aware: history {lacking[0]} needs timestamps "
                    "(one per entry)"
                )
        encoded = np.flatnonzero(shoppers.lengths > 0)
        part = shoppers.take(encoded)
        wanted = search_size(part, _take(every, encoded), self._bundle.repeat, self.num_items)
        rows = np.full((shoppers.num_shoppers, wanted), -1, dtype=np.int64)
        scores = np.full((shoppers.num_shoppers, wanted), np.nan, dtype=np.float32)
        if len(encoded):
            (embeddings,) = self._session.run([self._output], self._feeds(*part.model_inputs(self.max_len)))
            # OpenMP's thread count is per calling thread: server worker threads would otherwise start at
            # one per core, and an OpenMP team per single-query search is slower, badly so when loaded.
            faiss.omp_set_num_threads(self._search_threads)
            found_scores, found_rows = self._bundle.index.search(
                np.ascontiguousarray(embeddings, dtype=np.float32), wanted
            )
            rows[encoded], scores[encoded] = found_rows, found_scores
        ranked = recommend(
            shoppers, rows, scores, every, self._bundle.repeat, self._popular, self._popularity
        )
        lengths = shoppers.lengths
        results = []
        for i in range(shoppers.num_shoppers):
            hit = ranked.rows[i] >= 0
            results.append(
                Recommendation(
                    self._vocab.product_ids[ranked.rows[i][hit]].tolist(),
                    ranked.scores[i][hit].tolist(),
                    bool(ranked.fallback[i]),
                    int(shoppers.unknown[i]),
                    bool(lengths[i] > self.max_len),
                    bool(ranked.repeat_aware[i]),
                )
            )
        return results


def _take(rules: Rules | Sequence[Rules], positions: np.ndarray) -> Rules | list[Rules]:
    return rules if isinstance(rules, Rules) else [rules[i] for i in positions]
