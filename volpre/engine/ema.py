"""Exponential moving average (EMA) of a model's weights, kept on the training device.

The average lives in a ``torch.optim.swa_utils.AveragedModel`` (checkpoints and ``volpre export
--weights ema`` read its state dict: ``module.*`` and ``n_averaged``), but :func:`update_ema`
updates it instead of ``AveragedModel.update_parameters``, for two reasons:

- ``update_parameters(use_buffers=True)`` averages *every* buffer, integers included, and writes
  the float average back truncated: after a few updates at decay 0.9995-0.9999 a large share of
  SwinViT's ``relative_position_index`` is off by one (a corrupted network that still loads
  strictly). Here non-floating buffers (``relative_position_index``, ``num_batches_tracked``) are
  copied from the model.
- ``update_parameters`` tests ``n_averaged`` on the host (``bool(n_averaged == 0)``), a device sync
  per step when the average is on the GPU (and a host-to-device copy per step when it is not).
  Here the first update is known from the step count, and ``n_averaged`` is incremented on the
  device.

BatchNorm running statistics are floating buffers and are averaged like the weights (as
``AveragedModel(use_buffers=True)`` and timm's ``ModelEmaV3`` do): the averaged weights are a
blend of the recent weights, and the averaged statistics are the same blend of the statistics
those weights produced, whereas the live model's statistics belong to its latest weights alone.
The floating update is torch's own ``get_ema_multi_avg_fn``:
``ema = decay * ema + (1 - decay) * model``; the first update copies the model (as
``AveragedModel``: ``W_0^EMA = W_0^model``).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def build_ema(model: nn.Module, device: torch.device) -> AveragedModel:
    """A copy of ``model`` (parameters and buffers) on ``device``, to be updated by :func:`update_ema`."""
    return AveragedModel(model, device=device, use_buffers=True)


@torch.no_grad()
def update_ema(ema: AveragedModel, model: nn.Module, decay: float, first: bool) -> None:
    """One EMA step: floating parameters and buffers averaged with ``decay``, the others copied.

    Args:
        ema: from :func:`build_ema` (same architecture as ``model``, on ``model``'s device).
        model: the live model (not DDP-wrapped).
        decay: in [0, 1).
        first: the first update (copy everything, as ``AveragedModel``); the caller knows it
            from its step count, so no device value is read.
    """
    averaged, current, copied_to, copied_from = [], [], [], []
    ema_tensors = itertools.chain(ema.module.parameters(), ema.module.buffers())
    model_tensors = itertools.chain(model.parameters(), model.buffers())
    for mine, theirs in zip(ema_tensors, model_tensors, strict=True):
        if mine.is_floating_point() and not first:
            averaged.append(mine.detach())
            current.append(theirs.detach())
        else:
            copied_to.append(mine.detach())
            copied_from.append(theirs.detach())
    if averaged:
        get_ema_multi_avg_fn(decay)(averaged, current, None)
    for mine, theirs in zip(copied_to, copied_from):
        mine.copy_(theirs)
    ema.n_averaged.add_(1)
