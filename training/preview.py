"""Print candidates for a few Complete Journey households, answered by the serving library.

    python -m training.preview --bundle artifacts/demo/bundle --households 5 --k 10

Histories are each household's purchases before the evaluation cutoff, oldest first, as a production
caller would send them; the products bought in the household's next basket are marked with ``*``.
"""

from __future__ import annotations

import argparse

import numpy as np

from recsys.data.completejourney import load_complete_journey
from recsys.data.sequences import product_histories
from recsys.data.split import next_basket_targets, parse_cutoff, temporal_split
from recsys.data.vocabulary import Vocabulary
from recsys.rules import Rules
from serving.recommender import Recommender

NAME_COLUMNS = ("department", "product_category", "product_type", "brand")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--households", type=int, default=5)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--cutoff", default="2017-12-01")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    recommender = Recommender.load(args.bundle)
    train, test = temporal_split(load_complete_journey(), parse_cutoff(args.cutoff, "America/New_York"))
    targets = next_basket_targets(train, test, Vocabulary.build(train, min_baskets=5))
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(len(targets.shopper_ids), size=args.households, replace=False))
    shoppers = targets.shopper_ids[chosen]
    # with purchase times: the bundle's repeat-aware scorer (if any) uses them, as production would
    histories, seconds = product_histories(train, shoppers)
    answers = recommender.recommend_batch(histories, Rules(k=args.k), timestamps=seconds)

    items = recommender.items
    names = [c for c in NAME_COLUMNS if c in items.column_names]
    row_of = {pid: i for i, pid in enumerate(items.column("product_id").to_pylist())}
    print(f"bundle {recommender.bundle_id} ({recommender.metadata['model']['name']}), cutoff {args.cutoff}")
    for shopper, history, answer, i in zip(
        shoppers.tolist(), histories, answers, chosen.tolist(), strict=True
    ):
        bought = set(targets.all_items[i].tolist())
        scored = "P(next basket)" if answer.repeat_aware else "model score"
        print(
            f"\nhousehold {shopper}: {len(history)} past purchases, next basket {len(bought)} products "
            f"(* bought in it, r = bought before; score = {scored})"
        )
        past = set(history)
        for rank, (product, score) in enumerate(zip(answer.product_ids, answer.scores, strict=True), 1):
            label = " / ".join(str(items.column(c)[row_of[product]].as_py() or "-") for c in names)
            mark = ("*" if product in bought else " ") + ("r" if product in past else " ")
            print(f"  {rank:2d}. {mark} {product:>9d}  {score:7.3f}  {label}")


if __name__ == "__main__":
    main()
