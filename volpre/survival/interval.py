"""A 95% confidence interval for Harrell's C-index: the percentile bootstrap over subjects.

The C-index of a test set (:func:`volpre.survival.concordance_index`) is one number from a
finite sample of subjects; with a few dozen subjects it moves by several hundredths from sample
to sample. :func:`bootstrap_concordance` states that uncertainty as the percentile bootstrap
interval (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13): draw the test
subjects with replacement ``n_resamples`` times, recompute C on each draw, and take the
``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those values.

Resampling is by **subject** (a cluster bootstrap): every scan of a drawn subject enters the
resample, as often as the subject was drawn, because scans of one subject share one outcome and
are not independent. Copies of one subject never form a comparable pair (same time; see the
pair rule in :mod:`volpre.survival.concordance`). A draw without any comparable pair (possible
with very few events) has no C-index; it is redrawn no more than it takes and counted in
``skipped``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from volpre.survival.concordance import _as_float_vector, concordance_index

METHOD = "percentile bootstrap over subjects"
"""How :func:`bootstrap_concordance` computes its interval (for reports)."""


@dataclass(frozen=True)
class ConcordanceInterval:
    """Harrell's C of a test set with its percentile-bootstrap interval."""

    cindex: float
    """C of the whole test set, in [0, 1]."""
    low: float
    high: float
    """The interval's bounds (quantiles of the bootstrap distribution)."""
    level: float
    """Coverage, e.g. 0.95."""
    n_subjects: int
    n_entries: int
    """Distinct subjects and scored scans (entries)."""
    n_resamples: int
    """Bootstrap draws that had a C-index."""
    skipped: int
    """Draws without any comparable pair (redrawn)."""
    seed: int


def bootstrap_concordance(
    risk: torch.Tensor | np.ndarray,
    time: torch.Tensor | np.ndarray,
    event: torch.Tensor | np.ndarray,
    subjects: Sequence[str] | None = None,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> ConcordanceInterval:
    """Harrell's C of ``risk`` against ``(time, event)`` and its percentile-bootstrap interval.

    Args:
        risk, time, event: ``(n,)`` per scan, as for :func:`volpre.survival.concordance_index`.
        subjects: ``n`` subject ids (scans of one subject are drawn together); ``None``: every
            scan is its own subject.
        n_resamples: bootstrap draws with a C-index (>= 100).
        level: coverage of the interval, in (0, 1).
        seed: seed of the draws (``numpy.random.default_rng``): same inputs and seed, same interval.

    Raises:
        ValueError: bad shapes or values (see ``concordance_index``), ``subjects`` of another
            length, ``n_resamples`` < 100, ``level`` outside (0, 1), or more than ``n_resamples``
            draws without a comparable pair (too few events to bootstrap).
        ZeroDivisionError: the whole test set has no comparable pair.
    """
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 100:
        raise ValueError(f"bootstrap_concordance: n_resamples must be an integer >= 100, got {n_resamples!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_concordance: level must be in (0, 1), got {level!r}")
    risk_np, time_np, event_np = (_as_float_vector(v, name) for v, name in ((risk, "risk"), (time, "time"),
                                                                              (event, "event")))
    cindex = concordance_index(risk_np, time_np, event_np)  # checks shapes and values
    ids = [str(i) for i in range(risk_np.size)] if subjects is None else [str(s) for s in subjects]
    if len(ids) != risk_np.size:
        raise ValueError(f"bootstrap_concordance: got {len(ids)} subject ids for {risk_np.size} scans")
    names = sorted(set(ids))
    rows_of = [np.flatnonzero(np.asarray(ids) == name) for name in names]

    rng = np.random.default_rng(seed)
    values: list[float] = []
    skipped = 0
    while len(values) < n_resamples:
        drawn = rng.integers(0, len(names), size=len(names))
        rows = np.concatenate([rows_of[k] for k in drawn])
        try:
            values.append(concordance_index(risk_np[rows], time_np[rows], event_np[rows]))
        except ZeroDivisionError:
            skipped += 1
            if skipped > n_resamples:
                raise ValueError(
                    f"bootstrap_concordance: {skipped} of {skipped + len(values)} draws of {len(names)} subjects had "
                    "no comparable pair; too few events to bootstrap the C-index"
                ) from None
    low, high = np.quantile(np.asarray(values), [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return ConcordanceInterval(cindex=cindex, low=float(low), high=float(high), level=level, n_subjects=len(names),
                               n_entries=int(risk_np.size), n_resamples=len(values), skipped=skipped, seed=seed)
