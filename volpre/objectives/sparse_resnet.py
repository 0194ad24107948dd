"""SparK-style sparse execution of a :class:`~volpre.models.ResNet3DEncoder` on a masked input.

Dense convolutions see through a zero-filled mask: after one 3^3 convolution the masked region
holds values computed from visible voxels, and each further layer spreads them deeper. SparK
(Tian et al., ICLR 2023) emulates sparse convolution instead: after every convolution, BatchNorm
and pooling the masked positions are set back to zero, so every layer sees exactly zeros there,
and BatchNorm computes its batch statistics (and running statistics) over visible positions only.

:func:`sparse_resnet_features` runs the encoder's own modules (same parameters, same state dict,
nothing added to it) in that way. With every position visible it computes the same as the dense
``encoder(x)``.

BatchNorm is applied by :func:`masked_batch_norm` from the module's parameters and buffers. Its
statistics are those of this process's batch: a ``SyncBatchNorm`` is treated like a local
``BatchNorm3d`` (statistics are not reduced across processes).
"""

from __future__ import annotations

import torch
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from volpre.models.contract import FEATURE_STRIDES, check_encoder_input
from volpre.models.resnet import ResNet3DEncoder
from volpre.objectives.masking import expand_mask


def masked_batch_norm(x: torch.Tensor, visible: torch.Tensor, norm: _BatchNorm) -> torch.Tensor:
    """BatchNorm over visible positions only; masked positions come out exactly zero.

    In training mode (or without running statistics) the per-channel mean and biased variance are
    taken over visible positions of the whole batch, and the module's running statistics are
    updated from them as ``torch.nn.BatchNorm3d`` would (unbiased variance, ``momentum`` or a
    cumulative average when it is ``None``); in eval mode the running statistics are used.

    Args:
        x: ``(B, C, X, Y, Z)`` float.
        visible: ``(B, 1, X, Y, Z)`` bool, ``True`` where a position is visible.
        norm: the BatchNorm module whose affine parameters and buffers to use.

    Returns:
        ``(B, C, X, Y, Z)`` like ``x`` (statistics computed in float32).
    """
    visible_weight = visible.to(torch.float32)
    values = x.float()
    if norm.training or not norm.track_running_stats:
        count = visible_weight.sum()
        mean = (values * visible_weight).sum(dim=(0, 2, 3, 4)) / count.clamp_min(1.0)
        squared_deviation = (values - mean.view(1, -1, 1, 1, 1)).square() * visible_weight
        var = squared_deviation.sum(dim=(0, 2, 3, 4)) / count.clamp_min(1.0)
        if norm.training and norm.track_running_stats:
            with torch.no_grad():
                norm.num_batches_tracked.add_(1)
                factor = norm.momentum if norm.momentum is not None else 1.0 / norm.num_batches_tracked.float()
                unbiased = var * count / (count - 1.0).clamp_min(1.0)
                norm.running_mean.lerp_(mean.detach(), factor)
                norm.running_var.lerp_(unbiased.detach(), factor)
    else:
        mean, var = norm.running_mean, norm.running_var
    shape = (1, -1, 1, 1, 1)  # per-channel vectors broadcast over (B, C, X, Y, Z)
    out = (values - mean.view(shape)) * torch.rsqrt(var.view(shape) + norm.eps)
    if norm.affine:
        out = out * norm.weight.view(shape) + norm.bias.view(shape)
    return (out * visible_weight).to(x.dtype)


class _SparseRunner:
    """Runs encoder modules, re-zeroing masked positions after each; the mask is expanded per shape."""

    def __init__(self, visible_grid: torch.Tensor) -> None:
        self.visible_grid = visible_grid
        self._by_shape: dict[tuple[int, ...], torch.Tensor] = {}

    def visible(self, t: torch.Tensor) -> torch.Tensor:
        shape = tuple(t.shape[2:])
        if shape not in self._by_shape:
            self._by_shape[shape] = expand_mask(self.visible_grid, shape)
        return self._by_shape[shape]

    def zero_masked(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.visible(t).to(t.dtype)

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
