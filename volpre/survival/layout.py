"""Tensor layouts shared by the Cox loss, the concordance metric and the survival network.

- **risk**: ``(B,)`` or ``(B, 1)`` float, one log-hazard score per subject (any real value);
  a higher risk means an earlier event. :class:`~volpre.survival.network.SurvivalNet` returns
  ``(B, 1)``, like MONAI's classification networks, so it survives ``decollate_batch``.
- **label**: ``(B, 2)`` float, column 0 the follow-up time (any unit, the same for all
  subjects; only the order of times matters) and column 1 the event indicator: ``1`` means the
  event was observed at that time, ``0`` means the subject was censored then (event-free when
  last seen). This is the ``label`` a MONAI ``SupervisedTrainer`` or ``SupervisedEvaluator``
  hands to the loss and the metric, e.g. from a dataset item ``{"image": ..., "label": [t, e]}``.

The checks here look at shapes only (no values), so they never synchronise a GPU.
"""

from __future__ import annotations

import torch

LABEL_COLUMNS = ("time", "event")
"""Meaning of the columns of a survival ``label`` tensor, in order."""


def risk_vector(risk: torch.Tensor, who: str) -> torch.Tensor:
    """Return ``risk`` as a ``(B,)`` view, accepting ``(B,)`` or ``(B, 1)``.

    Args:
        risk: ``(B,)`` or ``(B, 1)`` float log-hazard scores.
        who: the caller's name, used in the error message.

    Raises:
        ValueError: ``risk`` has any other shape.
    """
    if risk.ndim == 2 and risk.shape[1] == 1:
        return risk[:, 0]
    if risk.ndim != 1:
        raise ValueError(
            f"{who}: risk must have shape (B,) or (B, 1) (one log-hazard per subject), got {tuple(risk.shape)}"
        )
    return risk


def split_survival_label(label: torch.Tensor, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a ``(B, 2)`` survival label into ``time`` ``(B,)`` and ``event`` ``(B,)`` (views).

    Args:
        label: ``(B, 2)`` tensor, columns ``[time, event]`` (see the module docstring).
        who: the caller's name, used in the error message.

    Returns:
        ``time`` (the label's dtype) and ``event`` (the label's dtype, 1 = event, 0 = censored).

    Raises:
        ValueError: ``label`` is not ``(B, 2)``.
    """
    if label.ndim != 2 or label.shape[1] != len(LABEL_COLUMNS):
        raise ValueError(
            f"{who}: label must have shape (B, 2) with columns [time, event] "
            f"(event 1 = observed, 0 = censored), got {tuple(label.shape)}"
        )
    return label[:, 0], label[:, 1]
