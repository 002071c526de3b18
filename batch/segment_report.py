"""The segments' one-page HTML report: sizes, profiles, top categories and churn, with matplotlib plots
embedded as PNG (one self-contained file, no scripts). Only this module imports matplotlib
(``caddie[report]``)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

import numpy as np

from batch.segments import Segment
from recsys.calibration import reliability


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render(
    segments: Sequence[Segment],
    top_categories: dict[int, list[tuple[str, float]]],
    churn: np.ndarray,
    churned: np.ndarray | None,
    title: str,
) -> str:
    """The report's HTML. ``top_categories``: per segment, (category, share of its members' purchases);
    ``churn`` [S] the predicted probabilities; ``churned`` [S] what happened, if known (then a reliability
    curve is drawn)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("the segments report needs matplotlib: pip install 'caddie[report]'") from error

    labels = [f"{s.segment}: {s.name}" for s in segments]
    plots = []
    figure, axis = plt.subplots(figsize=(7, 0.35 * len(segments) + 1))
    axis.barh(labels[::-1], [s.size for s in segments][::-1], color="#4c72b0")
    axis.set_xlabel("shoppers")
    axis.set_title("Segment sizes")
    plots.append(("Segment sizes", _png(figure)))
    plt.close(figure)

    figure, axes = plt.subplots(1, 3, figsize=(11, 0.35 * len(segments) + 1.5), sharey=True)
    panels = [
        ("recency_days", "days since last basket"),
        ("frequency", "baskets, last 90 days"),
        ("monetary", "spend, last 90 days"),
    ]
    for axis, (key, label) in zip(axes, panels, strict=True):
        axis.barh(labels[::-1], [s.medians[key] for s in segments][::-1], color="#55a868")
        axis.set_xlabel(f"median {label}")
    figure.suptitle("Recency, frequency, monetary value (medians)")
    plots.append(("RFM profile", _png(figure)))
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 4))
    if churned is not None:
        curve = reliability(churn, churned)  # deciles of equal count
        axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        axis.plot([p["predicted"] for p in curve], [p["observed"] for p in curve], marker="o")
        axis.set_xlabel("predicted churn probability (deciles)")
        axis.set_ylabel("observed churn rate")
        axis.set_title("Churn: reliability")
    else:
        axis.hist(churn, bins=30, color="#c44e52")
        axis.set_xlabel("predicted churn probability")
        axis.set_ylabel("shoppers")
        axis.set_title("Churn risk")
    plots.append(("Churn", _png(figure)))
    plt.close(figure)

    rows = "".join(
        f"<tr><td>{s.segment}</td><td>{html.escape(s.name)}</td><td>{s.lever}</td><td>{s.size}</td>"
        f"<td>{s.medians['recency_days']:.0f}</td><td>{s.medians['frequency']:.1f}</td>"
        f"<td>{s.medians['monetary']:.0f}</td><td>{s.churn:.2f}</td><td>"
        + ", ".join(f"{html.escape(name)} ({share:.0%})" for name, share in top_categories.get(s.segment, []))
        + "</td></tr>"
        for s in segments
    )
    images = "".join(
        f'<h2>{name}</h2><img alt="{name}" src="data:image/png;base64,{data}">' for name, data in plots
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><table><thead><tr><th>segment</th><th>name</th><th>lever</th>"
        "<th>shoppers</th><th>recency (days)</th><th>frequency</th><th>monetary</th><th>churn</th>"
        f"<th>top categories</th></tr></thead><tbody>{rows}</tbody></table>{images}</body></html>\n"
    )
