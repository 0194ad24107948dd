"""SparK-style sparse execution of a :class:`~volpre.models.ResNet3DEncoder` on a masked input.

Dense convolutions see through a zero-filled mask: after one 3^3 convolution the masked region
holds values computed from visible voxels, and each further layer spreads them deeper. SparK
(Tian et al., ICLR 2023) emulates sparse convolution instead: after every convolution, BatchNorm
and pooling the masked positions are set back to zero, so every layer sees exactly zeros there,
and BatchNorm computes its batch statistics (and running statistics) over visible positions only.

:func:`sparse_resnet_features` runs the encoder's own modules (same parameters, same state dict,
nothing added to it) in that way. With every position visible it computes the same as the dense
``encoder(x)``.

BatchNorm is applied by :func:`masked_batch_norm` from the module's parameters and buffers. A
``torch.nn.SyncBatchNorm`` (what ResNet BatchNorm becomes under DDP) reduces its statistics over
its process group, as SparK's ``SparseSyncBatchNorm2d`` does: the visible counts, sums and squared
deviations of every rank, and in the backward pass the gradient sums; a plain ``BatchNorm3d`` uses
this process's batch alone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from volpre.models.contract import FEATURE_STRIDES, check_encoder_input
from volpre.models.resnet import ResNet3DEncoder
from volpre.objectives.masking import VisibleAtEveryScale

_REDUCED_DIMS = (0, 2, 3, 4)
"""Batch and spatial axes of ``(B, C, X, Y, Z)``: BatchNorm statistics are per channel."""


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1, 1)


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


def statistics_group(norm: _BatchNorm):
    """The process group whose ranks share ``norm``'s statistics: a ``SyncBatchNorm``'s group (the
    default group when it names none) when that has more than one rank, else ``None`` (local)."""
    if not isinstance(norm, nn.SyncBatchNorm) or not (dist.is_available() and dist.is_initialized()):
        return None
    group = norm.process_group if norm.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class _MaskedBatchNormTraining(torch.autograd.Function):
    """Training-mode BatchNorm over visible positions, with an explicit backward.

    Everything of ``x``'s size is computed in ``x``'s own dtype (bf16 under autocast) and reduced
    with float32 accumulation; the per-channel statistics are float32 (float64 for float64 input). Only ``x`` and the bool mask
    are saved for backward, as ``torch.nn.BatchNorm3d`` saves only its input: no float32 copy of
    the activation exists at any time. Squared deviations are taken around ``pivot``, the mean
    rounded to ``x``'s dtype, and corrected exactly (``sum (x - m)^2 = sum (x - p)^2 - n (m - p)^2``),
    so bf16 storage costs no cancellation.

    With a process group, counts and sums, then squared deviations, then (backward) the gradient
    sums are all-reduced over it; parameter gradients stay local (DDP averages them), exactly as
    ``torch.nn.SyncBatchNorm``.
    """

    @staticmethod
    def forward(ctx, x, visible, weight, bias, eps, group):  # noqa: D102 - see the class docstring
        with torch.autocast(device_type=x.device.type, enabled=False):
            acc = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 input
            v = visible.to(x.dtype)
            local_count = visible.sum(dtype=acc).view(1)
            local_sum = (x * v).sum(dim=_REDUCED_DIMS, dtype=acc)
            count_and_sum = _all_reduce(torch.cat([local_count, local_sum]), group)
            count, total = count_and_sum[0], count_and_sum[1:]
            mean = total / count.clamp_min(1.0)
            pivot = mean.to(x.dtype)
            centered = (x - _per_channel(pivot)) * v
            squared = _all_reduce(centered.square().sum(dim=_REDUCED_DIMS, dtype=acc), group)
            del centered
            offset = mean - pivot.to(acc)
            squared_deviation = (squared - count * offset.square()).clamp_min(0.0)
            var = squared_deviation / count.clamp_min(1.0)
            invstd = torch.rsqrt(var + eps)
            out = F.batch_norm(x, mean, var, weight, bias, training=False, momentum=0.0, eps=eps) * v
        ctx.save_for_backward(x, visible, weight, mean, invstd, count)
        ctx.group = group
        unbiased = squared_deviation / (count - 1.0).clamp_min(1.0)
        ctx.mark_non_differentiable(mean, unbiased)
        return out, mean, unbiased

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_unbiased):  # noqa: D102 - see the class docstring
        x, visible, weight, mean, invstd, count = ctx.saved_tensors
        with torch.autocast(device_type=x.device.type, enabled=False):
            acc = mean.dtype
            grad_out = grad_out.to(x.dtype)
            v = visible.to(x.dtype)
            pivot = mean.to(x.dtype)
            g = grad_out * v
            sum_dy = g.sum(dim=_REDUCED_DIMS, dtype=acc)
            sum_dy_centered = (g * (x - _per_channel(pivot))).sum(dim=_REDUCED_DIMS, dtype=acc)
            del g
            offset = mean - pivot.to(acc)
            sum_dy_xmu = sum_dy_centered - offset * sum_dy  # sum over visible of dy * (x - mean)
            grad_weight = grad_bias = None
            if weight is not None:
                grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if ctx.needs_input_grad[2] else None
                grad_bias = sum_dy.to(weight.dtype) if ctx.needs_input_grad[3] else None
            grad_x = None
            if ctx.needs_input_grad[0]:
                sums = _all_reduce(torch.cat([sum_dy, sum_dy_xmu]), ctx.group)
                n = count.clamp_min(1.0)
                mean_dy, mean_dy_xmu = sums[: mean.numel()] / n, sums[mean.numel():] / n
                scale = invstd if weight is None else weight.to(acc) * invstd
                slope = -scale * invstd.square() * mean_dy_xmu
                intercept = -scale * mean_dy - slope * offset
                grad_x = (
                    grad_out * _per_channel(scale.to(x.dtype))
                    + (x - _per_channel(pivot)) * _per_channel(slope.to(x.dtype))
                    + _per_channel(intercept.to(x.dtype))
                ) * v
        return grad_x, None, grad_weight, grad_bias, None, None


def masked_batch_norm(x: torch.Tensor, visible: torch.Tensor, norm: _BatchNorm) -> torch.Tensor:
    """BatchNorm over visible positions only; masked positions come out exactly zero.

    In training mode (or without running statistics) the per-channel mean and biased variance are
    taken over visible positions of the whole batch (of every rank of a ``SyncBatchNorm``'s process
    group, see :func:`statistics_group`), and the module's running statistics are updated from them
    as ``torch.nn.BatchNorm3d`` would (unbiased variance, ``momentum`` or a cumulative average when
    it is ``None``); in eval mode the running statistics are used.

    Args:
        x: ``(B, C, X, Y, Z)`` float (float32, or bf16/fp16 under autocast: no float32 copy of it
            is made, statistics are accumulated in float32).
        visible: ``(B, 1, X, Y, Z)`` bool, ``True`` where a position is visible.
        norm: the BatchNorm module whose affine parameters and buffers to use.

    Returns:
        ``(B, C, X, Y, Z)`` in ``x``'s dtype.
    """
    weight, bias = (norm.weight, norm.bias) if norm.affine else (None, None)
    if not norm.training and norm.track_running_stats:
        return F.batch_norm(x, norm.running_mean, norm.running_var, weight, bias, False, 0.0, norm.eps) * visible.to(
            x.dtype
        )
    out, mean, unbiased = _MaskedBatchNormTraining.apply(x, visible, weight, bias, norm.eps, statistics_group(norm))
    if norm.training and norm.track_running_stats:
        with torch.no_grad():
            norm.num_batches_tracked.add_(1)
            factor = norm.momentum if norm.momentum is not None else 1.0 / norm.num_batches_tracked.float()
            norm.running_mean.lerp_(mean, factor)
            norm.running_var.lerp_(unbiased, factor)
    return out


class _SparseRunner(VisibleAtEveryScale):
    """Runs encoder modules, re-zeroing masked positions after each; the mask is expanded per shape."""

    def conv_norm(self, conv: nn.Module, norm: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
        y = conv(x)
        return masked_batch_norm(y, self.visible(y), norm)

    def block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(block, ResNetBottleneck):
            out = block.act(self.conv_norm(block.conv1, block.bn1, x))
            out = block.act(self.conv_norm(block.conv2, block.bn2, out))
            out = self.conv_norm(block.conv3, block.bn3, out)
        elif isinstance(block, ResNetBlock):
            out = block.act(self.conv_norm(block.conv1, block.bn1, x))
            out = self.conv_norm(block.conv2, block.bn2, out)
        else:
            raise TypeError(f"sparse ResNet execution supports MONAI ResNetBlock/ResNetBottleneck, got {type(block)}")
        if block.downsample is None:
            residual = x
        elif isinstance(block.downsample, nn.Sequential):  # shortcut "B": 1x1 conv + BatchNorm
            conv, norm = block.downsample
            residual = self.conv_norm(conv, norm, x)
        else:  # shortcut "A": strided subsampling + zero channels (a function, no parameters)
            residual = self.zero_masked(block.downsample(x))
        return block.act(out + residual)


def sparse_resnet_features(
    encoder: ResNet3DEncoder, x: torch.Tensor, visible_grid: torch.Tensor
) -> list[torch.Tensor]:
    """The encoder's five feature maps computed SparK-style on the visible part of ``x``.

    Args:
        encoder: the ResNet encoder (its modules and BatchNorm buffers are used and updated).
        x: ``(B, C, X, Y, Z)`` float, X/Y/Z multiples of 32.
        visible_grid: ``(B, 1, gx, gy, gz)`` bool, ``True`` for visible cells; each cell must cover
            a whole number of stride-32 positions (cell edge a multiple of 32 voxels).

    Returns:
        Five maps like ``encoder(x)`` (strides 2..32), each exactly zero at masked positions.
    """
    check_encoder_input(x, encoder.in_channels)
    deepest = tuple(size // FEATURE_STRIDES[-1] for size in x.shape[2:])
    if any(d % g for d, g in zip(deepest, visible_grid.shape[2:])):
        raise ValueError(
            f"mask grid {tuple(visible_grid.shape[2:])} on input {tuple(x.shape[2:])}: each mask cell must "
            f"cover a multiple of {FEATURE_STRIDES[-1]} voxels (the ResNet's total stride)"
        )
    run = _SparseRunner(visible_grid)
    h = encoder.act(run.conv_norm(encoder.conv1, encoder.bn1, run.zero_masked(x)))
    features = [h]
    if not encoder.no_max_pool:
        h = run.zero_masked(encoder.maxpool(h))
    for stage in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4):
        for block in stage:
            h = run.block(block, h)
        features.append(h)
    return features
