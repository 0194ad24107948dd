"""Harrell's concordance index (C-index) of risk scores against censored survival times.

Convention (the same as ``lifelines.utils.concordance_index(time, -risk, event)``): a higher risk
should mean an earlier event. A pair of subjects ``(i, j)`` is comparable when ``i`` had an event
and either ``t_i < t_j`` (whether ``j`` had an event or was censored), or ``t_i == t_j`` and ``j``
was censored. A comparable pair is concordant when ``risk_i > risk_j`` and counts one half when
``risk_i == risk_j``. ``C = (concordant + ties / 2) / comparable``, in ``[0, 1]``; 0.5 is chance.

Runs on the host in float64 numpy: a vectorised O(n^2) count in row blocks of bounded memory
(a few MB); n = 10 000 takes about 0.1 s.
"""

from __future__ import annotations

import numpy as np
import torch

_BLOCK_ELEMENTS = 1 << 21
"""Pairs compared per block: bounds the temporary boolean matrices to a few MB."""


def _as_float_vector(values: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to(device="cpu", dtype=torch.float64).numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(f"concordance_index: {name} must have shape (n,) or (n, 1), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"concordance_index: {name} holds {int((~np.isfinite(array)).sum())} NaN or infinite values")
    return array


def concordance_index(
    risk: torch.Tensor | np.ndarray,
    time: torch.Tensor | np.ndarray,
    event: torch.Tensor | np.ndarray,
) -> float:
    """Harrell's C of ``risk`` against ``(time, event)``; higher risk = earlier event.

    Args:
        risk: ``(n,)`` or ``(n, 1)`` scores, any real values (tensor on any device, or array).
        time: ``(n,)`` follow-up times, any unit.
        event: ``(n,)`` 0/1 or bool, 1 = event observed at ``time``, 0 = censored at ``time``.

    Returns:
        The C-index in ``[0, 1]`` as a Python float.

    Raises:
        ValueError: shapes differ, values are NaN/infinite, or ``event`` holds values other than 0/1.
        ZeroDivisionError: no pair is comparable (e.g. no events, or all events tied in time
            with no censored subject at or after them).
    """
    risk_np = _as_float_vector(risk, "risk")
    time_np = _as_float_vector(time, "time")
    event_np = _as_float_vector(event, "event")
    if not risk_np.shape == time_np.shape == event_np.shape:
        raise ValueError(
            "concordance_index: risk, time and event must hold one value per subject, "
            f"got {risk_np.shape[0]}, {time_np.shape[0]} and {event_np.shape[0]} values"
        )
    bad_events = np.unique(event_np[(event_np != 0) & (event_np != 1)])
    if bad_events.size:
        raise ValueError(
            f"concordance_index: event must be 0 (censored) or 1 (event observed), found {bad_events[:5].tolist()}"
        )
    is_event = event_np == 1

    comparable = concordant = tied = 0
    event_rows = np.flatnonzero(is_event)
    block = max(1, _BLOCK_ELEMENTS // max(1, time_np.size))
    for first in range(0, event_rows.size, block):
        rows = event_rows[first : first + block]
        row_time = time_np[rows, None]
        row_risk = risk_np[rows, None]
        is_comparable = (time_np > row_time) | ((time_np == row_time) & ~is_event)
        comparable += int(is_comparable.sum())
        concordant += int((is_comparable & (risk_np < row_risk)).sum())
        tied += int((is_comparable & (risk_np == row_risk)).sum())

    if comparable == 0:
        raise ZeroDivisionError(
            f"concordance_index: no comparable pair among {time_np.size} subjects with "
            f"{event_rows.size} events (a pair needs an event strictly before the other subject's time, "
            "or at the time the other subject was censored)"
        )
    return (concordant + 0.5 * tied) / comparable
