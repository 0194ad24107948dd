"""SparK-style sparse execution of an nnU-Net encoder (``dynamic_network_architectures``) on a masked input.

As :mod:`volpre.objectives.sparse_resnet` does for the 3D ResNet, after every convolution,
normalisation, pooling and element-wise layer the masked positions are set back to zero, so every
layer sees exactly zeros there and a masked region never leaks into the statistics or values of
visible ones (Tian et al., ICLR 2023, "Designing BERT for Convolutional Networks: Sparse and
Hierarchical Masked Modeling").

**Sparse normalisation.** nnU-Net normalises with ``InstanceNorm3d(affine=True)``: statistics per
*sample* and channel, in training and at inference alike, no running statistics. Its sparse form
(:func:`masked_instance_norm`) takes each sample's mean and variance over that sample's visible
positions only, so masked zeros do not drag the statistics towards zero and a sample's masking does
not change another's. That is what SparK's sparse BatchNorm does per batch, moved to nnU-Net's
per-sample normalisation (nnssl's SparK for nnU-Net normalises the same way). Plans that use
``BatchNorm3d`` get SparK's masked batch norm (:func:`volpre.objectives.sparse_resnet.masked_batch_norm`).

:func:`sparse_encoder_features` runs the encoder's own modules (same parameters, nothing added to
the state dict), walking ``PlainConvEncoder`` and ``ResidualEncoder`` (``StackedConvBlocks``,
``ConvDropoutNormReLU``, ``StackedResidualBlocks`` of ``BasicBlockD``/``BottleneckD``); with every
position visible it computes what ``encoder(x)`` computes. :func:`check_sparse_support` refuses,
before training, encoders with layers whose sparse form is not defined here (squeeze-excitation:
its global pooling would mix masked and visible positions; instance norms with running statistics).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.regularization import DropPath, SqueezeExcite
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD, StackedResidualBlocks
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU, StackedConvBlocks
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.pooling import _AvgPoolNd, _MaxPoolNd

from volpre.objectives.masking import VisibleAtEveryScale
from volpre.objectives.sparse_resnet import masked_batch_norm

_CONTAINERS = (PlainConvEncoder, ResidualEncoder, StackedConvBlocks, ConvDropoutNormReLU, StackedResidualBlocks,
               BasicBlockD, BottleneckD, nn.Sequential, nn.ModuleList)
_ELEMENTWISE = (_DropoutNd, DropPath, nn.Identity)
"""Layers acting on each position alone (besides the activations of ``torch.nn.modules.activation``)."""


def masked_instance_norm(x: torch.Tensor, visible: torch.Tensor, norm: _InstanceNorm) -> torch.Tensor:
    """Instance norm over each sample's visible positions; masked positions come out exactly zero.

    Args:
        x: ``(B, C, X, Y, Z)`` float.
        visible: ``(B, 1, X, Y, Z)`` bool, ``True`` where a position is visible (each sample has one).
        norm: the ``InstanceNorm3d`` whose ``eps`` and affine parameters to use (no running statistics).

    Returns:
        ``(B, C, X, Y, Z)`` like ``x``: per sample and channel, ``(x - mean) / sqrt(var + eps)`` with the
        biased variance over visible positions (as ``InstanceNorm3d`` over all positions), then the affine
        map; statistics in float32.
    """
    weight = visible.to(torch.float32)
    values = x.float()
    dims = (2, 3, 4)
    count = weight.sum(dim=dims, keepdim=True).clamp_min(1.0)
    mean = (values * weight).sum(dim=dims, keepdim=True) / count
    var = ((values - mean).square() * weight).sum(dim=dims, keepdim=True) / count
    out = (values - mean) * torch.rsqrt(var + norm.eps)
    if norm.affine:
        shape = (1, -1, 1, 1, 1)
        out = out * norm.weight.view(shape) + norm.bias.view(shape)
    return (out * weight).to(x.dtype)


def _is_elementwise(module: nn.Module) -> bool:
    return isinstance(module, _ELEMENTWISE) or type(module).__module__ == "torch.nn.modules.activation"


def check_sparse_support(encoder: nn.Module) -> None:
    """Raise ``TypeError`` naming the first layer of ``encoder`` that has no sparse form here."""
    if not isinstance(encoder, (PlainConvEncoder, ResidualEncoder)):
        raise TypeError(
            f"objective mvm (SparK) on the nnunet encoder supports nnU-Net's PlainConvEncoder and ResidualEncoder, "
            f"got {type(encoder).__name__}; use objective.name=dae"
        )
    for name, module in encoder.named_modules():
        if isinstance(module, SqueezeExcite):
            raise TypeError(f"objective mvm (SparK): encoder layer {name} is squeeze-excitation, whose global pooling "
                            "has no sparse form; use objective.name=dae for this plan")
        if isinstance(module, _InstanceNorm) and module.track_running_stats:
            raise TypeError(f"objective mvm (SparK): encoder layer {name} is an instance norm with running statistics; "
                            "volpre's sparse instance norm uses per-sample statistics only (nnU-Net's default)")
        known = isinstance(module, (_CONTAINERS, _ConvNd, _InstanceNorm, _BatchNorm, _AvgPoolNd, _MaxPoolNd))
        if not known and not _is_elementwise(module):
            raise TypeError(f"objective mvm (SparK): encoder layer {name or '(root)'} ({type(module).__name__}) has no "
                            "sparse form in volpre.objectives.sparse_nnunet; use objective.name=dae for this plan")


class _SparseRunner(VisibleAtEveryScale):
    """Runs encoder modules, re-zeroing masked positions after each; the mask is expanded per shape."""

    def run(self, module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:  # noqa: C901 - one case per layer type
        if module is None or not isinstance(module, nn.Module):  # nnU-Net's identity lambdas
            return x if module is None else self.zero_masked(module(x))
        if isinstance(module, _InstanceNorm):
            return masked_instance_norm(x, self.visible(x), module)
        if isinstance(module, _BatchNorm):
            return masked_batch_norm(x, self.visible(x), module)
        if isinstance(module, (_ConvNd, _AvgPoolNd, _MaxPoolNd)) or _is_elementwise(module):
            return self.zero_masked(module(x))
        if isinstance(module, ConvDropoutNormReLU):
            return self.run(module.all_modules, x)
        if isinstance(module, StackedConvBlocks):
            return self.run(module.convs, x)
        if isinstance(module, StackedResidualBlocks):
            return self.run(module.blocks, x)
        if isinstance(module, (BasicBlockD, BottleneckD)):
            convs = (module.conv1, module.conv2) if isinstance(module, BasicBlockD) else (
                module.conv1, module.conv2, module.conv3)
            out = x
            for conv in convs:
                out = self.run(conv, out)
            if module.apply_stochastic_depth:
                out = self.run(module.drop_path, out)
            if module.apply_se:
                raise TypeError("squeeze-excitation has no sparse form (see check_sparse_support)")
            out = out + self.run(module.skip, x)
            last = module.nonlin2 if isinstance(module, BasicBlockD) else module.nonlin3
            return self.run(last, out)
        if isinstance(module, nn.Sequential):
            for child in module:
                x = self.run(child, x)
            return x
        raise TypeError(f"{type(module).__name__} has no sparse form (see check_sparse_support)")


def sparse_encoder_features(encoder: nn.Module, x: torch.Tensor, visible_grid: torch.Tensor) -> list[torch.Tensor]:
    """The encoder's skips computed SparK-style on the visible part of ``x``.

    Args:
        encoder: a ``PlainConvEncoder`` or ``ResidualEncoder`` (its modules are used as they are).
        x: ``(B, C, *roi)`` float.
        visible_grid: ``(B, 1, gx, gy, gz)`` bool, ``True`` for visible cells; each cell must cover a whole
            number of deepest-map positions (cell edges multiples of the total stride on each axis).

    Returns:
        One map per stage like ``encoder(x)`` (finest first), each exactly zero at masked positions.
    """
    strides = encoder_total_strides(encoder)
    deepest = [size // stride for size, stride in zip(x.shape[2:], strides)]
    if any(size % stride for size, stride in zip(x.shape[2:], strides)) or any(
            d % g for d, g in zip(deepest, visible_grid.shape[2:])):
        raise ValueError(
            f"mask grid {tuple(visible_grid.shape[2:])} on input {tuple(x.shape[2:])}: each mask cell must cover a "
            f"multiple of the encoder's total stride {list(strides)} on every axis"
        )
    run = _SparseRunner(visible_grid)
    h = run.zero_masked(x)
    if isinstance(encoder, ResidualEncoder) and encoder.stem is not None:
        h = run.run(encoder.stem, h)
    features = []
    for stage in encoder.stages:
        h = run.run(stage, h)
        features.append(h)
    return features


def encoder_total_strides(encoder: nn.Module) -> tuple[int, int, int]:
    """Product of the stage strides of an nnU-Net encoder on each axis (its ``strides`` attribute)."""
    totals = [1, 1, 1]
    for stride in encoder.strides:
        per_axis: Sequence[int] = [stride] * 3 if isinstance(stride, int) else stride
        totals = [t * int(s) for t, s in zip(totals, per_axis)]
    return tuple(totals)  # type: ignore[return-value]
