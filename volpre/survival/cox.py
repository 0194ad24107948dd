"""Negative Cox partial log-likelihood, as a function and as a MONAI-compatible loss module.

For subjects with log-hazard ``r_i``, follow-up time ``t_i`` and event indicator ``e_i``, the
risk set of time ``t`` is ``R(t) = {j : t_j >= t}``. With ``D(t)`` the subjects whose event
happened at ``t`` (``d = |D(t)|``) the partial log-likelihood is, summed over event times ``t``:

- Breslow: ``sum_{i in D(t)} r_i - d * log S_R(t)``
- Efron:   ``sum_{i in D(t)} r_i - sum_{l=0}^{d-1} log(S_R(t) - l/d * S_D(t))``

with ``S_R(t) = sum_{j in R(t)} exp(r_j)`` and ``S_D(t) = sum_{j in D(t)} exp(r_j)``. The two agree
when no two events share a time. The loss is the negative of that, divided by the number of
events in the batch.

The computation sorts once by time and uses a reversed ``logcumsumexp`` for the risk sets
(O(B log B), no loop over subjects, no host synchronisation), works in log space so that large
risks do not overflow, and runs in at least float32 with autocast disabled.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from volpre.survival.layout import risk_vector, split_survival_label

TIES = ("breslow", "efron")
"""Ways to handle events that share a time."""


def _check_ties(ties: str, who: str) -> None:
    if ties not in TIES:
        raise ValueError(f"{who}: ties must be one of {', '.join(repr(t) for t in TIES)}, got {ties!r}")


def cox_ph_loss(
    risk: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    ties: Literal["breslow", "efron"] = "breslow",
) -> torch.Tensor:
    """Negative Cox partial log-likelihood of ``risk``, averaged over the events of the batch.

    Args:
        risk: ``(B,)`` or ``(B, 1)`` float log-hazard scores (any real value; higher = earlier
            event). Computed in float32, or float64 if given float64.
        time: ``(B,)`` follow-up times (any real dtype and unit; only their order matters).
        event: ``(B,)`` bool or 0/1 numbers; nonzero means the event was observed at ``time``,
            zero means censored at ``time``.
        ties: ``"breslow"`` or ``"efron"`` handling of events that share a time.

    Returns:
        A 0-dim tensor on ``risk``'s device, float32 (float64 for float64 ``risk``), ``>= 0``
        for Breslow. A batch without events, or with a single subject, gives a zero that is still
        connected to ``risk`` (its gradient is zero, never NaN).

    Raises:
        ValueError: ``ties`` is not one of ``"breslow"``, ``"efron"``, or the shapes of
            ``risk``, ``time`` and ``event`` do not describe the same ``B`` subjects.
    """
    _check_ties(ties, "cox_ph_loss")
    risk = risk_vector(risk, "cox_ph_loss")
    if time.shape != risk.shape or event.shape != risk.shape:
        raise ValueError(
            f"cox_ph_loss: time and event must have shape {tuple(risk.shape)} like risk, "
            f"got time {tuple(time.shape)} and event {tuple(event.shape)}"
        )
    compute_dtype = torch.promote_types(risk.dtype, torch.float32)
    with torch.autocast(device_type=risk.device.type, enabled=False):
        risk = risk.to(compute_dtype)
        time = time.to(risk.device)
        is_event = event.to(risk.device) != 0

        order = torch.argsort(time)
        time_sorted = time[order].contiguous()
        risk_sorted = risk[order]
        event_sorted = is_event[order]

        # log sum_{k' >= k} exp(risk_sorted[k']); the risk set of a subject starts at the first
        # sorted position that holds its time (so that subjects with tied times are all included).
        log_tail_sum = torch.logcumsumexp(risk_sorted.flip(0), dim=0).flip(0)
        group_start = torch.searchsorted(time_sorted, time_sorted, side="left")
        log_risk_set = log_tail_sum[group_start]
        log_denominator = log_risk_set  # of each event's term in the partial likelihood
        if ties == "efron":
            log_denominator = log_risk_set + _efron_log_correction(
                risk_sorted, event_sorted, time_sorted, group_start, log_risk_set
            )

        negative_log_likelihood = torch.where(event_sorted, log_denominator - risk_sorted, 0.0).sum()
        num_events = event_sorted.sum().clamp(min=1)
        return negative_log_likelihood / num_events


def _efron_log_correction(
    risk_sorted: torch.Tensor,
    event_sorted: torch.Tensor,
    time_sorted: torch.Tensor,
    group_start: torch.Tensor,
    log_risk_set: torch.Tensor,
) -> torch.Tensor:
    """``log(1 - l/d * S_D/S_R)`` for each event (0 for censored subjects), all inputs sorted by time.

    ``l`` numbers the events of one tied time ``0 .. d-1`` (the sum over them is what matters,
    not which event gets which ``l``). ``S_D/S_R`` is summed from ``exp(r_i - log S_R) <= 1``,
    which cannot overflow.
    """
    group_end = torch.searchsorted(time_sorted, time_sorted, side="right")
    events_before = F.pad(torch.cumsum(event_sorted, dim=0), (1, 0))  # (B + 1,) events at positions < k
    num_tied_events = events_before[group_end] - events_before[group_start]
    rank_in_group = torch.where(event_sorted, events_before[:-1] - events_before[group_start], 0)
    event_share = torch.where(event_sorted, torch.exp(risk_sorted - log_risk_set), 0.0)
    tied_share = torch.zeros_like(event_share).index_add(0, group_start, event_share)[group_start]
    fraction = rank_in_group.to(risk_sorted.dtype) / num_tied_events.clamp(min=1).to(risk_sorted.dtype)
    return torch.log1p(-fraction * tied_share)


class CoxPHLoss(nn.Module):
    """Negative Cox partial log-likelihood as a loss module, for MONAI's ``SupervisedTrainer``.

    The trainer calls ``loss_function(pred, label)``; here ``pred`` is the network's risk
    ``(B,)`` or ``(B, 1)`` and ``label`` is ``(B, 2)`` float with columns ``[time, event]``
    (event 1 = observed, 0 = censored; see :mod:`volpre.survival.layout`). In a bundle::

        loss: {_target_: volpre.survival.CoxPHLoss, ties: efron}

    Args:
        ties: ``"breslow"`` (default) or ``"efron"`` handling of events that share a time.
    """

    def __init__(self, ties: Literal["breslow", "efron"] = "breslow") -> None:
        super().__init__()
        _check_ties(ties, "CoxPHLoss")
        self.ties = ties

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Loss of risk ``pred`` ``(B,)``/``(B, 1)`` given ``label`` ``(B, 2)``; see :func:`cox_ph_loss`."""
        time, event = split_survival_label(label, "CoxPHLoss")
        return cox_ph_loss(pred, time, event, ties=self.ties)

    def extra_repr(self) -> str:
        return f"ties={self.ties!r}"
