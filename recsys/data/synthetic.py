"""Seeded synthetic receipts with planted, learnable structure.

The generator writes canonical receipts (see :mod:`recsys.data.schema`) whose structure is known, so
what a model learns can be checked against what was planted:

- **Zipf popularity**: popularity ranks are a random permutation of the catalogue (ids carry no rank);
  the product of rank ``r`` has weight ``(r + 1) ** -zipf_exponent``.
- **Co-purchase clusters**: the products are partitioned into ``num_clusters`` clusters of (almost)
  equal size; the catalogue's ``category`` names the cluster (``department`` groups categories).
  Drawing from a cluster means drawing by popularity restricted to it, so it is Zipf too.
- **Preferred clusters**: each shopper has ``clusters_per_shopper`` clusters (uniform, may coincide).
  A line that is not a staple comes from one of them with probability ``CLUSTER_SHARE``, else from
  global popularity.
- **Staples with purchase cycles**: each shopper has ``staples_per_shopper`` staples, drawn like other
  lines but by the flatter ``popularity ** STAPLE_TEMPER`` (habits are personal), duplicates dropped.
  Staple ``i`` has a purchase rate ``r_i`` (the rates sum to ``repeat_share * mean_basket_size``,
  each capped at 1) and a random phase, and is in the shopper's ``t``-th basket when
  ``(phase_i - t * r_i) mod 1 < r_i``: it recurs every ``1 / r_i`` baskets (gaps of the floor or the
  ceiling of that). So about ``repeat_share`` of all lines are repeat purchases of staples.
- **Basket size**: the due staples plus a Poisson number of other lines, with mean
  ``mean_basket_size`` minus the expected staples; at least one line. A product can sit on two lines
  of one basket, as on real receipts.
- **Weekly rhythm**: a shopper's basket times are sorted uniform draws over the period mapped through
  the distribution of local (day, hour) cells weighted by ``DAY_WEIGHTS`` (Saturday busiest) times
  ``HOUR_WEIGHTS`` (closed 22:00-07:00 local time). So baskets are time-ordered within a shopper,
  basket ids increase with time, and all lines of a basket share its timestamp (whole seconds).
- **Launches**: ``new_product_share`` of the products launch at a uniform instant within the period;
  the others, including every cluster's most popular product, at its start. A line that would buy a
  product before its launch buys a same-cluster product on sale from the start instead.
- **Shoppers' activity**: 1 + Poisson(Gamma(2)) baskets, mean ``mean_baskets``. Quantities are 1 (80%),
  2 (16%), 3 or 4; prices are the product's list price (lognormal around 3, in cents).

Randomness comes from PCG64 streams keyed by ``(seed, block)`` for fixed blocks of ``BLOCK_SHOPPERS``
shoppers (and one for the catalogue), so the output depends on the config but not on
``shoppers_per_chunk``, which only sets how rows are grouped into tables and files. Everything is
vectorised per block; the only Python loops run over blocks and chunks.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.data.schema import PRICE, QUANTITY, receipts_schema

PRODUCT_ID_OFFSET = 100_000
OPTIONAL = (QUANTITY, PRICE)  # the optional receipt columns it writes (no coupon discounts)
SHOPPER_ID_OFFSET = 1_000_000
BASKET_ID_OFFSET = 10_000_000
BLOCK_SHOPPERS = 1024  # shoppers per random stream (part of the output's definition: keep it fixed)
CLUSTER_SHARE = 0.7  # of non-staple items (and staples) drawn from the shopper's clusters
STAPLE_TEMPER = 0.5  # staples follow popularity ** 0.5: habits are more personal than the crowd's picks
DAY_WEIGHTS = np.array([0.85, 0.8, 0.85, 0.95, 1.15, 1.45, 1.1])  # Monday .. Sunday
HOUR_WEIGHTS = np.array(
    [0, 0, 0, 0, 0, 0, 0, 0.3, 0.6, 0.9, 1.2, 1.4, 1.5, 1.3, 1.1, 1.2, 1.5, 1.9, 1.8, 1.3, 0.8, 0.4, 0, 0]
)
DEPARTMENTS = (
    "produce",
    "dairy",
    "bakery",
    "meat",
    "seafood",
    "frozen",
    "pantry",
    "snacks",
    "beverages",
    "household",
    "personal care",
    "deli",
)
BRANDS_PER_CLUSTER = 8
QUANTITIES = np.repeat([1.0, 2.0, 3.0, 4.0], [205, 41, 8, 2])  # ~ 1 + Geometric(0.8), drawn by one byte
# Uncompressed: the fastest to write, and dictionary encoding already does most of the shrinking.
PARQUET_COMPRESSION = "none"

_HOUR_US = 3_600_000_000
_DAY_US = 24 * _HOUR_US


@dataclass
class SyntheticConfig:
    """What to generate; the same config always gives the same receipts and products."""

    num_shoppers: int = 10_000
    num_products: int = 5_000
    start: str = "2017-01-01"  # first day (local date)
    days: int = 364
    timezone: str = "UTC"
    seed: int = 0
    mean_baskets: float = 30.0  # per shopper over the period
    mean_basket_size: float = 8.0
    zipf_exponent: float = 1.05  # global product popularity
    num_clusters: int = 50  # co-purchase clusters (products partitioned into clusters)
    clusters_per_shopper: int = 2
    repeat_share: float = 0.5  # share of basket items drawn from the shopper's own staples
    staples_per_shopper: int = 12
    new_product_share: float = 0.05  # products launched during the period (not purchasable before)
    shoppers_per_chunk: int = 200_000

    def __post_init__(self) -> None:
        checks = {
            "num_shoppers >= 1": self.num_shoppers >= 1,
            "1 <= num_clusters <= num_products": 1 <= self.num_clusters <= self.num_products,
            "days >= 1": self.days >= 1,
            "seed >= 0": self.seed >= 0,
            "mean_baskets >= 1": self.mean_baskets >= 1,
            "mean_basket_size >= 1": self.mean_basket_size >= 1,
            "zipf_exponent >= 0": self.zipf_exponent >= 0,
            "clusters_per_shopper >= 1": self.clusters_per_shopper >= 1,
            "0 <= repeat_share <= 1": 0 <= self.repeat_share <= 1,
            "staples_per_shopper >= 0": self.staples_per_shopper >= 0,
            "0 <= new_product_share < 1": 0 <= self.new_product_share < 1,
            "shoppers_per_chunk >= 1": self.shoppers_per_chunk >= 1,
        }
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid SyntheticConfig: needs {', '.join(failed)}")


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent PCG64 stream per key, so streams do not depend on how many were used before."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


@dataclass(frozen=True)
class _Sampler:
    """Exact draws from many discrete distributions ("groups") at O(1) per draw, vectorised.

    Group ``g`` holds consecutive positions whose cumulative probabilities ``within`` rise to exactly 1.
    A guide table splits each group's [0, 1) into a power-of-two number of equal bins (at least four per
    position) and stores the first position each bin can hit. A bin that can hit two positions is
    settled by one comparison with ``within``; only the few that can hit three or more (``guide`` -1)
    need a binary search.
    """

    items: np.ndarray  # value at each position
    within: np.ndarray  # cumulative probability within the group at each position
    prob: np.ndarray  # probability within the group of each position
    cdf: np.ndarray  # group + within: increasing over all positions, for the binary search
    group_last: np.ndarray  # last position of positive probability of each group
    bin_first: np.ndarray  # first bin of each group
    bins: np.ndarray  # number of bins of each group (float, a power of two, so u * bins is exact)
    guide: np.ndarray  # first position each bin can hit, -1 where it can hit three or more

    @classmethod
    def build(cls, items: np.ndarray, weights: np.ndarray, groups: np.ndarray) -> _Sampler:
        """Groups ``0 .. max(groups)`` must each have a positive total weight."""
        order = np.argsort(groups, kind="stable")
        items, weights, groups = items[order], weights[order].astype(np.float64), groups[order]
        counts = np.bincount(groups)
        ends = np.cumsum(counts) - 1
        cum = np.cumsum(weights)
        group_before = np.concatenate([[0.0], cum[ends[:-1]]])
        before = np.repeat(group_before, counts)
        total = np.repeat(cum[ends] - group_before, counts)
        # Zero weights add exactly 0, so a group's last positive position gets exactly 1.
        within = (cum - before) / total
        cdf = groups + within
        group_last = np.searchsorted(cdf, np.arange(1, len(counts) + 1), "left")
        bins = 2.0 ** np.ceil(np.log2(4 * counts))
        bin_first = np.concatenate([[0], np.cumsum(bins[:-1])]).astype(np.int64)
        bin_group = np.repeat(np.arange(len(counts)), bins.astype(np.int64))
        edge = bin_group + (np.arange(len(bin_group)) - bin_first[bin_group]) / bins[bin_group]
        first = np.searchsorted(cdf, edge, "right")
        last = np.searchsorted(cdf, edge + 1 / bins[bin_group], "left")
        guide = np.where(last - first <= 1, first, -1)
        return cls(items, within, weights / total, cdf, group_last, bin_first, bins, guide)

    def draw(self, groups: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Positions drawn from ``groups`` by uniforms ``u`` in [0, 1); monotone in ``u`` per group."""
        pos = self.guide[self.bin_first[groups] + (u * self.bins[groups]).astype(np.int64)]
        crowded = np.flatnonzero(pos < 0)
        pos += u >= self.within[pos]
        found = np.searchsorted(self.cdf, groups[crowded] + u[crowded], "right")
        # The clip guards against g + u rounding up to g + 1, the next group's territory.
        pos[crowded] = np.minimum(found, self.group_last[groups[crowded]])
        return pos


def _to_utc(local_us: np.ndarray, timezone: str) -> np.ndarray:
    """Local wall-clock microseconds to UTC ones (DST gaps and overlaps fall in closed hours)."""
    local = pa.array(local_us, pa.timestamp("us"))
    utc = pc.assume_timezone(local, timezone=timezone, ambiguous="earliest", nonexistent="latest")
    return utc.cast(pa.int64()).to_numpy()


@dataclass(frozen=True)
class _World:
    """Everything shared by all shoppers: the catalogue, its samplers and the calendar."""

    products: pa.Table
    num_clusters: int
    cluster: np.ndarray  # cluster of each product index
    price: np.ndarray  # list price of each product index
    launch: np.ndarray  # launch of each product index, µs since the epoch (UTC)
    items: _Sampler  # product index by source group (see build)
    calendar: _Sampler  # one group over the period's local (day, hour) cells
    cell_start: np.ndarray  # UTC start of each cell, µs
    basket_rest: _Sampler  # number of non-staple lines of a basket: Poisson

    @classmethod
    def build(cls, config: SyntheticConfig) -> _World:
        rng = _rng(config.seed, 0)
        n, k = config.num_products, config.num_clusters
        rank = rng.permutation(n)
        popularity = (rank + 1.0) ** -config.zipf_exponent
        cluster = rng.permutation(n) % k
        price = np.maximum(np.round(rng.lognormal(np.log(3.0), 0.7, n), 2), 0.25)
        brand = cluster * BRANDS_PER_CLUSTER + rng.integers(0, BRANDS_PER_CLUSTER, n)

        days = np.datetime64(config.start, "D").astype(np.int64) + np.arange(config.days + 1)
        local = days[:, None] * _DAY_US + np.arange(24) * _HOUR_US
        utc = _to_utc(local.ravel(), config.timezone)
        cells = config.days * 24
        period_start, period_end = utc[0], utc[cells]
        weekday = (days[:-1] + 3) % 7  # 1970-01-01 was a Thursday
        weights = (DAY_WEIGHTS[weekday][:, None] * HOUR_WEIGHTS).ravel()
        calendar = _Sampler.build(np.arange(cells), weights, np.zeros(cells, np.int64))

        # Each cluster's most popular product is on sale from the start, so substitutes always exist.
        top_rank = np.full(k, n)
        np.minimum.at(top_rank, cluster, rank)
        candidates = np.flatnonzero(rank != top_rank[cluster])
        new = rng.choice(candidates, min(round(config.new_product_share * n), len(candidates)), replace=False)
        launch = np.full(n, period_start)
        launch[new] = period_start + rng.integers(0, period_end - period_start, len(new))
        on_sale = launch == period_start

        # Poisson pmf (in logs, unnormalised) up to where it vanishes; the sampler is ~10x rng.poisson.
        staple_mean = min(config.repeat_share * config.mean_basket_size, config.staples_per_shopper)
        rest_mean = config.mean_basket_size - staple_mean
        rest = np.arange(int(rest_mean + 12 * np.sqrt(rest_mean) + 12))
        log_pmf = rest * np.log(max(rest_mean, 1e-300)) - np.concatenate([[0.0], np.cumsum(np.log(rest[1:]))])
        basket_rest = _Sampler.build(rest, np.exp(log_pmf - log_pmf.max()), np.zeros(len(rest), np.int64))

        # Item groups: clusters 0..K-1 and K (everything) by popularity, the same K+1 groups again by
        # staple weight, then cluster by cluster the products on sale from the start (substitutes).
        index = np.arange(n)
        sources = np.concatenate([cluster, np.full(n, k)])
        staple_weight = popularity**STAPLE_TEMPER
        items = _Sampler.build(
            np.tile(index, 5),
            np.concatenate([popularity, popularity, staple_weight, staple_weight, popularity * on_sale]),
            np.concatenate([sources, sources + k + 1, cluster + 2 * (k + 1)]),
        )
        departments = pa.array(DEPARTMENTS).take(pa.array(cluster % len(DEPARTMENTS)))
        category_names = pa.array([f"{DEPARTMENTS[c % len(DEPARTMENTS)]}-{c:03d}" for c in range(k)])
        brand_names = pa.array([f"brand-{b:05d}" for b in range(k * BRANDS_PER_CLUSTER)])
        products = pa.table(
            {
                "product_id": PRODUCT_ID_OFFSET + index,
                "department": departments,
                "category": category_names.take(pa.array(cluster)),
                "brand": brand_names.take(pa.array(brand)),
                "price": price,
                "launch": pa.array(launch).view(pa.timestamp("us", tz=config.timezone)),
            }
        )
        return cls(products, k, cluster, price, launch, items, calendar, utc[:cells], basket_rest)

    def draw_products(self, rng: np.random.Generator, shopper: np.ndarray, sources: np.ndarray) -> np.ndarray:
        """One product index per entry of ``shopper``, from one of its preferred clusters or globally.

        ``sources[s]`` holds the groups of shopper ``s``'s preferred clusters and then the global group.
        """
        preferred = sources.shape[1] - 1
        # u < CLUSTER_SHARE picks preferred cluster floor(u * preferred / CLUSTER_SHARE), else global.
        u = rng.random(len(shopper), dtype=np.float32)
        pick = np.minimum((u * np.float32(preferred / CLUSTER_SHARE)).astype(np.int64), preferred)
        groups = sources.ravel()[shopper * sources.shape[1] + pick]
        return self.items.items[self.items.draw(groups, rng.random(len(shopper)))]

    def substitute(self, rng: np.random.Generator, product: np.ndarray) -> np.ndarray:
        """A product of the same cluster that is on sale from the start, for each of ``product``."""
        groups = 2 * (self.num_clusters + 1) + self.cluster[product]
        return self.items.items[self.items.draw(groups, rng.random(len(product)))]


def _block(
    world: _World, config: SyntheticConfig, block: int, first_basket_id: int
) -> tuple[pa.Table, np.ndarray, int]:
    """Receipts of block ``block``'s shoppers (ordered by shopper, then time), rows per shopper, baskets."""
    rng = _rng(config.seed, 1, block)
    first = block * BLOCK_SHOPPERS
    n = min(BLOCK_SHOPPERS, config.num_shoppers - first)
    num_staples = config.staples_per_shopper

    # Shoppers: activity, preferred clusters, staples with purchase rates and phases.
    num_baskets = 1 + rng.poisson(rng.gamma(2.0, (config.mean_baskets - 1) / 2, n))
    clusters = rng.integers(0, config.num_clusters, (n, config.clusters_per_shopper))
    sources = np.column_stack([clusters, np.full(n, config.num_clusters)])
    staple_sources = sources + config.num_clusters + 1
    staples = world.draw_products(rng, np.repeat(np.arange(n), num_staples), staple_sources)
    staples = np.sort(staples.reshape(n, num_staples), axis=1)
    rate_weights = rng.gamma(2.0, 1.0, (n, num_staples))
    rate_weights[:, 1:][staples[:, 1:] == staples[:, :-1]] = 0  # a duplicate staple is no staple
    target = config.repeat_share * config.mean_basket_size
    rates = target * rate_weights / np.maximum(rate_weights.sum(axis=1, keepdims=True), 1e-12)
    # float32 halves the memory traffic of the (baskets x staples) matrix below; cycles stay exact enough.
    rates = np.minimum(rates, 1.0).astype(np.float32)
    phases = rng.random((n, num_staples), dtype=np.float32)

    # Baskets: shopper, ordinal within the shopper, time.
    total_baskets = int(num_baskets.sum())
    shopper = np.repeat(np.arange(n), num_baskets)
    ordinal = np.arange(total_baskets) - np.repeat(np.cumsum(num_baskets) - num_baskets, num_baskets)
    # Sorted uniforms per shopper: normalised partial sums of num_baskets + 1 exponential gaps.
    cum = np.cumsum(rng.exponential(size=total_baskets + n))
    ends = np.cumsum(num_baskets + 1) - 1
    before = np.concatenate([[0.0], cum[ends[:-1]]])
    u = (cum[np.arange(total_baskets) + shopper] - before[shopper]) / (cum[ends] - before)[shopper]
    cell = world.calendar.draw(np.zeros(total_baskets, np.int64), u)
    within = 1 - (world.calendar.within[cell] - u) / world.calendar.prob[cell]
    seconds = np.clip((within * 3600).astype(np.int64), 0, 3599)
    timestamp = world.cell_start[cell] + seconds * 1_000_000

    # Lines: each basket's due staples, then the rest drawn from the shopper's clusters or globally.
    basket_rates = rates[shopper]
    phase = phases[shopper] - ordinal.astype(np.float32)[:, None] * basket_rates
    due = np.flatnonzero(phase - np.floor(phase) < basket_rates)  # basket-major, like the lines
    due_basket, due_lane = np.divmod(due, num_staples)
    staple_lines = np.bincount(due_basket, minlength=total_baskets)
    rest = world.basket_rest
    other_lines = rest.items[rest.draw(np.zeros(total_baskets, np.int64), rng.random(total_baskets))]
    other_lines[staple_lines + other_lines == 0] = 1
    sizes = staple_lines + other_lines
    is_staple = np.repeat(
        np.tile([True, False], total_baskets), np.column_stack([staple_lines, other_lines]).ravel()
    )
    product = np.empty(len(is_staple), np.int64)
    product[is_staple] = staples.ravel()[shopper[due_basket] * num_staples + due_lane]
    product[~is_staple] = world.draw_products(rng, np.repeat(shopper, other_lines), sources)
    row_time = np.repeat(timestamp, sizes)
    early = np.flatnonzero(world.launch[product] > row_time)
    product[early] = world.substitute(rng, product[early])

    columns = [
        np.repeat(SHOPPER_ID_OFFSET + first + shopper, sizes),
        np.repeat(first_basket_id + np.arange(total_baskets), sizes),
        PRODUCT_ID_OFFSET + product,
        pa.array(row_time).view(pa.timestamp("us", tz=config.timezone)),
        QUANTITIES[rng.integers(0, len(QUANTITIES), len(product), dtype=np.uint8)],
        world.price[product],
    ]
    table = pa.Table.from_arrays(columns, schema=receipts_schema(config.timezone, OPTIONAL))
    return table, np.bincount(shopper, weights=sizes, minlength=n).astype(np.int64), total_baskets


def _pieces(config: SyntheticConfig, world: _World) -> Iterator[tuple[int, pa.Table]]:
    """(chunk index, table) in order; a chunk's table is the concatenation of its pieces."""
    basket_id = BASKET_ID_OFFSET
    per_chunk = config.shoppers_per_chunk
    for block in range(-(-config.num_shoppers // BLOCK_SHOPPERS)):
        table, shopper_rows, num_baskets = _block(world, config, block, basket_id)
        basket_id += num_baskets
        row_offsets = np.concatenate([[0], np.cumsum(shopper_rows)])
        first = block * BLOCK_SHOPPERS
        start, end = first, first + len(shopper_rows)
        while start < end:  # a block can straddle chunk boundaries
            chunk = start // per_chunk
            stop = min(end, (chunk + 1) * per_chunk)
            lo, hi = row_offsets[start - first], row_offsets[stop - first]
            yield chunk, table.slice(lo, hi - lo)
            start = stop


def products(config: SyntheticConfig) -> pa.Table:
    """The catalogue: ``product_id``, department, category (= co-purchase cluster), brand, price, launch.

    ``launch`` is the period's start for products on sale from the beginning, else the launch instant.
    """
    return _World.build(config).products


def generate(config: SyntheticConfig) -> Iterator[pa.Table]:
    """Canonical receipts, one table per ``shoppers_per_chunk`` shoppers (ordered by shopper, then time)."""
    for _, pieces in itertools.groupby(_pieces(config, _World.build(config)), key=itemgetter(0)):
        yield pa.concat_tables([piece for _, piece in pieces])


def generate_table(config: SyntheticConfig) -> pa.Table:
    """All receipts of ``config`` in one table."""
    return pa.concat_tables(generate(config))


class _PartFile:
    """One chunk's parquet file, written under a hidden temporary name and renamed when complete."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.temporary = path.with_name(f".{path.name}.tmp")
        self.writer = pq.ParquetWriter(self.temporary, schema, compression=PARQUET_COMPRESSION)

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def commit(self) -> None:
        self.writer.close()
        os.replace(self.temporary, self.path)


def write_parquet(config: SyntheticConfig, path: str | Path) -> dict[str, float]:
    """Write the receipts as ``path/part-NNNNN.parquet``, one file per chunk; returns rows, files, seconds.

    Each file appears only when complete (written to a hidden temporary name, then ``os.replace``d).
    Writing runs on a second thread, overlapping the generation of the next rows. ``path`` must not hold
    parquet files already, so a dataset never mixes two runs.
    """
    started = time.perf_counter()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.parquet")):
        raise FileExistsError(f"{str(out)!r} already holds parquet files; write to an empty directory")
    schema = receipts_schema(config.timezone, OPTIONAL)
    rows = files = 0
    pending: deque[Future[None]] = deque()

    def submit(task: Callable[..., None], *args: object) -> None:
        pending.append(pool.submit(task, *args))
        while len(pending) > 2:  # bounds the memory held by tables waiting to be written
            pending.popleft().result()

    with ThreadPoolExecutor(max_workers=1) as pool:
        for chunk, pieces in itertools.groupby(_pieces(config, _World.build(config)), key=itemgetter(0)):
            part = _PartFile(out / f"part-{chunk:05d}.parquet", schema)
            for _, piece in pieces:
                submit(part.write, piece)
                rows += piece.num_rows
            submit(part.commit)
            files += 1
        while pending:
            pending.popleft().result()
    return {"rows": rows, "files": files, "seconds": time.perf_counter() - started}
