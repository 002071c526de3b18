"""Contact allocation: the Lagrangian method's time and gap against HiGHS' exact MILP, and at scale.

    python -m benchmarks.allocation [--small 10000 20] [--large 1000000 40] [--cap 2]

Synthetic week (seeded): P(conversion) of shopper i for campaign j is ``sigmoid(a_i + b_j + noise)``,
with a shopper effect ``a_i`` shared by every campaign (the same good shoppers top every audience) and
pairs under 0.01 ineligible; audiences of 1%-10% of the shoppers. Reported per size: seconds, the value
found, the gap to the exact optimum (small size only) and to the method's own dual bound, and the
uncoordinated plan (each campaign its own top audience, then the cap cuts the excess) for reference.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from batch.allocation import Problem, allocate, check, exact, independent


def week(shoppers: int, campaigns: int, cap: int, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    logits = rng.normal(-4.0, 1.0, (shoppers, 1)) + rng.normal(0.0, 0.5, (1, campaigns))
    logits = (logits + rng.normal(0.0, 0.7, (shoppers, campaigns))).astype(np.float32)
    values = 1.0 / (1.0 + np.exp(-logits))
    values[values < 0.01] = 0.0
    audience = rng.integers(shoppers // 100, shoppers // 10 + 1, campaigns)
    return Problem(values, cap, audience)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, nargs=2, default=[10_000, 20])
    parser.add_argument("--large", type=int, nargs=2, default=[1_000_000, 40])
    parser.add_argument("--cap", type=int, default=2)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for (shoppers, campaigns), with_exact in ((args.small, True), (args.large, False)):
        problem = week(shoppers, campaigns, args.cap)
        start = time.perf_counter()
        found = allocate(problem)
        seconds = time.perf_counter() - start
        check(problem, found.contacts)
        naive = independent(problem)
        line = f"{shoppers:,} x {campaigns}: lagrangian {seconds:.1f} s, value {found.value:.2f}, "
        line += f"gap to its bound {found.gap:.4%}; uncoordinated {naive.value:.2f} "
        line += f"({naive.value / found.value - 1:+.2%})"
        if with_exact:
            start = time.perf_counter()
            optimum = exact(problem)
            line += f"; exact {time.perf_counter() - start:.1f} s, value {optimum.value:.2f}, "
            line += f"gap {1 - found.value / optimum.value:.4%}"
        print(line)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
