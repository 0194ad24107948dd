"""Summaries of label-efficiency records: mean ± sd over seeds per fraction and arm, a table, a plot.

A record (one run) is a dict with at least ``fraction``, ``seed``, ``arm`` (``"pretrained"`` or
``"scratch"``), ``metric``, ``train_subjects`` and ``train_entries``. :func:`summarize` gives one
row per fraction::

    {"fraction": 0.25, "train_subjects": 2, "train_entries": [3, 4],
     "pretrained": {"mean": 0.41, "sd": 0.03, "n_seeds": 3},
     "scratch": {"mean": 0.38, "sd": 0.04, "n_seeds": 3},
     "difference": {"mean": 0.03, "sd": 0.02, "n_seeds": 3}}

``sd`` is the sample standard deviation over seeds (``None`` with one seed). ``difference`` is
pretrained − scratch, paired by seed (same subset and seed), over the seeds that have both arms.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ARMS = ("pretrained", "scratch")
"""The two arms of every (fraction, seed): the exported encoder, and random initialisation."""


def _stats(values: Sequence[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values) if values else None,
        "sd": statistics.stdev(values) if len(values) >= 2 else None,
        "n_seeds": len(values),
    }


def summarize(records: Sequence[Mapping[str, Any]], fractions: Sequence[float]) -> list[dict[str, Any]]:
    """One row per fraction (in the order given) with both arms' and the paired difference's statistics."""
    rows = []
    for fraction in fractions:
        of_fraction = [r for r in records if r["fraction"] == fraction]
        by_arm = {arm: {r["seed"]: float(r["metric"]) for r in of_fraction if r["arm"] == arm} for arm in ARMS}
        paired = sorted(set(by_arm["pretrained"]) & set(by_arm["scratch"]))
        row: dict[str, Any] = {
            "fraction": fraction,
            "train_subjects": sorted({r["train_subjects"] for r in of_fraction}),
            "train_entries": sorted({r["train_entries"] for r in of_fraction}),
        }
        for arm in ARMS:
            row[arm] = _stats([by_arm[arm][seed] for seed in sorted(by_arm[arm])])
        row["difference"] = _stats([by_arm["pretrained"][s] - by_arm["scratch"][s] for s in paired])
        rows.append(row)
    return rows


def _span(values: Sequence[int]) -> str:
    if not values:
        return "-"
    return str(values[0]) if values[0] == values[-1] else f"{values[0]}-{values[-1]}"


def _mean_sd(stats: Mapping[str, Any], signed: bool = False) -> str:
    if stats["mean"] is None:
        return "-"
    mean = f"{stats['mean']:+.4f}" if signed else f"{stats['mean']:.4f}"
    return f"{mean} ± {'n/a' if stats['sd'] is None else format(stats['sd'], '.4f')}"


def format_table(summary: Sequence[Mapping[str, Any]], metric_name: str, metric_label: str) -> str:
    """A plain-text table of :func:`summarize` rows (values to 4 decimals, as in the JSON).

    Columns: fraction, training subjects, training entries (range over seeds), pretrained and
    scratch ``mean ± sd``, the paired difference pretrained − scratch ``mean ± sd``, and seeds.
    """
    header = ["fraction", "subjects", "entries", "pretrained", "scratch", "pretrained - scratch", "seeds"]
    lines = [[f"{row['fraction']:g}", _span(row["train_subjects"]), _span(row["train_entries"]),
              _mean_sd(row["pretrained"]), _mean_sd(row["scratch"]), _mean_sd(row["difference"], signed=True),
              _span(sorted({row[arm]["n_seeds"] for arm in ARMS}))] for row in summary]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [f"{metric_name}: {metric_label} on the val split, final weights; mean ± sd over seeds"]
    out.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    out += ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def plot_label_efficiency(summary: Sequence[Mapping[str, Any]], metric_label: str, title: str,
                          path: str | os.PathLike[str]) -> Figure:
    """Write ``path`` (PNG): the metric vs the fraction of labelled subjects, one line per arm.

    Points are the mean over seeds, error bars one sd (none with a single seed). Drawn with the
    Agg canvas directly (no pyplot, no global backend switch). Returns the figure.
    """
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for arm, marker in zip(ARMS, ("o", "s")):
        rows = [row for row in summary if row[arm]["mean"] is not None]
        fractions = [row["fraction"] for row in rows]
        means = [row[arm]["mean"] for row in rows]
        sds = [0.0 if row[arm]["sd"] is None else row[arm]["sd"] for row in rows]
        seeds = _span(sorted({row[arm]["n_seeds"] for row in rows}))
        axes.errorbar(fractions, means, yerr=sds, marker=marker, capsize=4, label=f"{arm} (seeds: {seeds})")
    axes.set_xlabel("fraction of labelled training subjects")
    axes.set_ylabel(metric_label)
    axes.set_xticks([row["fraction"] for row in summary])
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(Path(path), dpi=120)
    return figure
