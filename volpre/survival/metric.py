"""Ignite metric: Harrell's C-index over every subject seen in an epoch, on all processes.

A MONAI bundle uses it as the evaluator's key metric::

    key_metric:
      val_cindex:
        _target_: volpre.survival.ConcordanceIndex
        output_transform: "$monai.handlers.from_engine(['pred', 'label'])"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

from volpre.survival.concordance import concordance_index
from volpre.survival.layout import risk_vector, split_survival_label

_Batch = torch.Tensor | Sequence[torch.Tensor]
"""A batch tensor, or a list of per-subject tensors (a MONAI engine's decollated output)."""


def _as_batch(values: _Batch, name: str) -> torch.Tensor:
    """A batch tensor, or a list of per-subject tensors (MONAI's decollated output) stacked into one."""
    if isinstance(values, torch.Tensor):
        return values
    if isinstance(values, Sequence) and len(values) > 0 and all(isinstance(v, torch.Tensor) for v in values):
        return torch.stack(list(values))
    raise TypeError(
        f"ConcordanceIndex.update: {name} must be a tensor or a non-empty list of per-subject tensors, "
        f"got {type(values).__name__}"
    )


class ConcordanceIndex(Metric):
    """Harrell's C (higher risk = earlier event) of all ``(risk, label)`` pairs of an epoch.

    ``update((risk, label))`` takes ``risk`` ``(B,)`` or ``(B, 1)`` and ``label`` ``(B, 2)`` with
    columns ``[time, event]`` (see :mod:`volpre.survival.layout`), each either as a batch tensor
    or as a list of per-subject tensors (what MONAI engines produce after decollating). Updates
    keep detached copies on the tensors' own device (no host synchronisation per iteration).

    ``compute()`` gathers every process's subjects with ``ignite.distributed`` (processes may hold
    different numbers of subjects, as with MONAI's ``DistributedSampler(even_divisible=False)``),
    then returns :func:`~volpre.survival.concordance.concordance_index` of all of them as a float,
    the same on every process. It raises ``ignite.exceptions.NotComputableError`` before any
    update and ``ZeroDivisionError`` when no pair is comparable.

    Args:
        output_transform: maps the engine's output to ``(risk, label)``; for MONAI engines
            ``monai.handlers.from_engine(["pred", "label"])``.
    """

    def __init__(self, output_transform: Callable[[Any], Any] = lambda output: output) -> None:
        self._risks: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        super().__init__(output_transform=output_transform)

    @reinit__is_reduced
    def reset(self) -> None:
        self._risks = []
        self._labels = []

    @reinit__is_reduced
    def update(self, output: tuple[_Batch, _Batch]) -> None:
        risk_in, label_in = output
        risk = risk_vector(_as_batch(risk_in, "risk"), "ConcordanceIndex.update")
        label = _as_batch(label_in, "label")
        split_survival_label(label, "ConcordanceIndex.update")
        if label.shape[0] != risk.shape[0]:
            raise ValueError(
                f"ConcordanceIndex.update: got {risk.shape[0]} risks but {label.shape[0]} labels; "
                "expected one [time, event] label per risk"
            )
        self._risks.append(risk.detach().clone())
        self._labels.append(label.detach().clone())

    def compute(self) -> float:
        # one (n, 3) float64 table [risk, time, event] per process, so one gather moves everything;
        # a process without subjects still takes part in the gather (with 0 rows)
        table = torch.cat(
            [torch.zeros(0, 3, dtype=torch.float64)]
            + [
                torch.cat([risk[:, None].to("cpu", torch.float64), label.to("cpu", torch.float64)], dim=1)
                for risk, label in zip(self._risks, self._labels)
            ]
        )
        if idist.get_world_size() > 1:
            counts = idist.all_gather(torch.tensor([table.shape[0]]))
            shapes = [[int(n), 3] for n in counts.tolist()]
            table = torch.cat(idist.all_gather_tensors_with_shapes(table, shapes))
        if table.shape[0] == 0:
            raise NotComputableError("ConcordanceIndex must have at least one example before it can be computed")
        return concordance_index(table[:, 0], table[:, 1], table[:, 2])
