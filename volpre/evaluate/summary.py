"""Summaries of label-efficiency records: mean, sd and 95% interval over seeds per fraction and arm, a table, a plot.

A record (one run) is a dict with at least ``fraction``, ``seed``, ``arm`` (``"pretrained"`` or
``"scratch"``), ``metric``, ``train_subjects`` and ``train_entries``. :func:`summarize` gives one
row per fraction::

    {"fraction": 0.25, "train_subjects": [2], "train_entries": [3, 4],
     "pretrained": {"mean": 0.41, "sd": 0.03, "n_seeds": 3, "ci95": [0.335, 0.485]},
     "scratch": {"mean": 0.38, "sd": 0.04, "n_seeds": 3, "ci95": [0.281, 0.479]},
     "difference": {"mean": 0.03, "sd": 0.02, "n_seeds": 3, "ci95": [-0.020, 0.080]}}

``sd`` is the sample standard deviation over seeds (``ddof=1``). ``difference`` is pretrained −
scratch, paired by seed (both arms of a seed train on the same subjects from the same random
state), over the seeds that have both arms. ``ci95`` is the two-sided 95% **Student t interval
over seeds** (:func:`t_interval`): ``mean ± t(0.975, n - 1) · sd / sqrt(n)``. It treats the seeds
as independent draws of the whole run (subset of subjects, initialisation, crops), so it
describes seed-to-seed variation on this validation set; it does not include the uncertainty of
a small validation set itself. ``sd`` and ``ci95`` are ``None`` with fewer than two seeds.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import t as student_t

ARMS = ("pretrained", "scratch")
"""The two arms of every (fraction, seed): the exported encoder, and random initialisation."""

CI_LEVEL = 0.95
CI_METHOD = "Student t interval over seeds (n - 1 degrees of freedom)"
"""How every ``ci95`` of a summary is computed (written into ``results.json``)."""


def t_interval(values: Sequence[float], level: float = CI_LEVEL) -> tuple[float, float] | None:
    """Two-sided Student t confidence interval for the mean of ``values``; ``None`` for fewer than two values.

    ``mean ± t_q · sd / sqrt(n)`` with ``sd`` the sample standard deviation (``ddof=1``) and
    ``t_q`` the ``(1 + level) / 2`` quantile of Student's t with ``n - 1`` degrees of freedom
    (``scipy.stats.t.ppf``), e.g. 4.303 for 3 values at 95%.
    """
    n = len(values)
    if n < 2:
        return None
    mean = statistics.fmean(values)
    half = float(student_t.ppf((1.0 + level) / 2.0, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


def _stats(values: Sequence[float]) -> dict[str, Any]:
    interval = t_interval(values)
    return {
        "mean": statistics.fmean(values) if values else None,
        "sd": statistics.stdev(values) if len(values) >= 2 else None,
        "n_seeds": len(values),
        "ci95": None if interval is None else list(interval),
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


def _mean_ci(stats: Mapping[str, Any], signed: bool = False) -> str:
    if stats["mean"] is None:
        return "-"
    number = "{:+.4f}" if signed else "{:.4f}"
    interval = "[n/a]" if stats["ci95"] is None else "[" + ", ".join(number.format(v) for v in stats["ci95"]) + "]"
    return f"{number.format(stats['mean'])} {interval}"


def format_table(summary: Sequence[Mapping[str, Any]], metric_name: str, metric_label: str) -> str:
    """A plain-text table of :func:`summarize` rows (values to 4 decimals, as in the JSON).

    Columns: fraction, training subjects, training entries (range over seeds), pretrained and
    scratch ``mean [95% CI]``, the paired difference pretrained − scratch ``mean [95% CI]``, and
    seeds. A last line says, per fraction, whether the difference's interval lies above 0,
    below 0 or contains it.
    """
    header = ["fraction", "subjects", "entries", "pretrained", "scratch", "pretrained - scratch", "seeds"]
    lines = [[f"{row['fraction']:g}", _span(row["train_subjects"]), _span(row["train_entries"]),
              _mean_ci(row["pretrained"]), _mean_ci(row["scratch"]), _mean_ci(row["difference"], signed=True),
              _span(sorted({row[arm]["n_seeds"] for arm in ARMS}))] for row in summary]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [f"{metric_name}: {metric_label} on the val split, final weights; mean over seeds "
           f"[95% {CI_METHOD}]"]
    out.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    out += ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    verdicts = [f"{row['fraction']:g}: {difference_verdict(row['difference'])}" for row in summary]
    out.append("pretrained - scratch, 95% interval: " + "; ".join(verdicts))
    return "\n".join(out)


def difference_verdict(stats: Mapping[str, Any]) -> str:
    """``"above 0"``, ``"below 0"``, ``"contains 0"`` for a difference's ``ci95``, or ``"no interval"``."""
    if stats["ci95"] is None:
        return f"no interval ({stats['n_seeds']} seed{'s' if stats['n_seeds'] != 1 else ''})"
    low, high = stats["ci95"]
    return "above 0" if low > 0 else "below 0" if high < 0 else "contains 0"


def _error_bars(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float], list[float]]:
    """Means and the lower/upper error-bar lengths of the 95% intervals (0 where there is none)."""
    means = [row[key]["mean"] for row in rows]
    lower = [0.0 if row[key]["ci95"] is None else row[key]["mean"] - row[key]["ci95"][0] for row in rows]
    upper = [0.0 if row[key]["ci95"] is None else row[key]["ci95"][1] - row[key]["mean"] for row in rows]
    return means, lower, upper


def plot_label_efficiency(summary: Sequence[Mapping[str, Any]], metric_label: str, title: str,
                          path: str | os.PathLike[str]) -> Figure:
    """Write ``path`` (PNG): left, the metric vs the fraction of labelled subjects, one line per arm;
    right, the paired difference pretrained − scratch with a line at 0.

    Points are the mean over seeds, error bars the 95% t interval over seeds (none with a single
    seed). The fraction axis is logarithmic. Drawn with the Agg canvas directly (no pyplot, no
    global backend switch). Returns the figure (``figure.axes[0]`` the arms, ``[1]`` the difference).
    """
    figure = Figure(figsize=(11.0, 4.4), layout="constrained")
    FigureCanvasAgg(figure)
    arms_axes, difference_axes = figure.subplots(1, 2)
    fractions_all = [row["fraction"] for row in summary]
    for arm, marker in zip(ARMS, ("o", "s")):
        rows = [row for row in summary if row[arm]["mean"] is not None]
        means, lower, upper = _error_bars(rows, arm)
        seeds = _span(sorted({row[arm]["n_seeds"] for row in rows}))
        arms_axes.errorbar([row["fraction"] for row in rows], means, yerr=[lower, upper], marker=marker, capsize=4,
                           label=f"{arm} (seeds: {seeds})")
    arms_axes.set_ylabel(metric_label)
    arms_axes.set_title(title)
    arms_axes.legend()
    rows = [row for row in summary if row["difference"]["mean"] is not None]
    means, lower, upper = _error_bars(rows, "difference")
    difference_axes.errorbar([row["fraction"] for row in rows], means, yerr=[lower, upper], marker="D", capsize=4,
                             color="tab:green", label="pretrained - scratch (paired by seed)")
    difference_axes.axhline(0.0, color="black", linewidth=0.8)
    difference_axes.set_ylabel("pretrained - scratch")
    difference_axes.set_title("paired difference, 95% t interval over seeds")
    difference_axes.legend()
    for axes in (arms_axes, difference_axes):
        axes.set_xscale("log")
        axes.set_xticks(fractions_all, [f"{f:g}" for f in fractions_all])
        axes.minorticks_off()
        axes.set_xlabel("fraction of labelled training subjects")
        axes.grid(alpha=0.3)
    figure.savefig(Path(path), dpi=120)
    return figure
