"""Frozen encoder features: the five maps of a whole volume (or some of them), read at voxel centres or pooled.

The encoder runs in eval mode (BatchNorm with its running statistics, no dropout or drop-path)
under ``torch.no_grad``; :func:`frozen` restores every submodule's train/eval flag afterwards, so
a probe inside a training loop leaves the model as it found it.

"Upsampled" features are trilinear interpolation of each map to the input's voxel grid
(``F.interpolate(mode="trilinear", align_corners=False)``: the map's voxels are cells of
``stride^3`` input voxels, read at the input voxels' centres, clamped at the border).
:func:`features_at` reads that upsampled feature at given voxels without building the
full-resolution maps (``grid_sample`` at the same positions, border-clamped, which gives the same
numbers), so a probe can fit on a sample of voxels and still mean "upsampled multi-scale features".

:func:`recompute_batchnorm_statistics` replaces the running statistics of an encoder's BatchNorm
layers by those of given volumes (the probe's ``--bn-stats train``): a pretraining objective that
disrupts or masks its inputs leaves running statistics of the disrupted inputs, which eval mode
then applies to clean ones (AdaBN, Li et al. 2016, recomputes them on the target data).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from volpre.evaluate.errors import EvaluationError

LEVELS = (0, 1, 2, 3, 4)
"""The encoder's maps (see :mod:`volpre.models.contract`): level ``i`` at stride ``2**(i+1)``."""


def check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    """``levels`` sorted, after checking that they are distinct levels of :data:`LEVELS`.

    Raises:
        EvaluationError: empty, repeated or unknown levels.
    """
    chosen = tuple(levels)
    if not chosen or len(set(chosen)) != len(chosen) or not set(chosen) <= set(LEVELS) or any(
            isinstance(level, bool) for level in chosen):
        raise EvaluationError(f"levels: got {list(chosen)}, expected distinct levels among "
                              f"{', '.join(map(str, LEVELS))} (level i is the encoder's map at stride 2^(i+1))")
    return tuple(sorted(chosen))


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode without gradients for the ``with`` block; every submodule's
    ``training`` flag is restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        for m, training in modes:
            m.training = training


def recompute_batchnorm_statistics(encoder: nn.Module, images: Sequence[torch.Tensor], device: torch.device) -> int:
    """Set every BatchNorm layer's running mean and variance to their averages over ``images``.

    Each image is one batch of one volume, passed in order through the encoder with only its
    BatchNorm layers in train mode (dropout and drop-path stay off), without gradients. With
    ``momentum=None`` PyTorch keeps the cumulative average, so afterwards ``running_mean`` is the mean
    over the volumes of each channel's mean over the volume's voxels, and ``running_var`` the mean of
    the volumes' unbiased variances (in train mode each layer normalises with the volume's own
    statistics, so a deeper layer's statistics are those of inputs normalised that way). Weights,
    biases and every layer's train/eval flag and momentum are as before; ``num_batches_tracked``
    counts the volumes.

    Args:
        encoder: a volpre encoder on ``device``.
        images: ``(C, X, Y, Z)`` float volumes (e.g. the probe's ``train`` images), X/Y/Z multiples of 32.
        device: the encoder's device.

    Returns:
        The number of BatchNorm layers recomputed.

    Raises:
        EvaluationError: the encoder has no BatchNorm layer (e.g. Swin's layer norms keep no
            running statistics), or ``images`` is empty.
    """
    layers = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        raise EvaluationError(f"bn_stats: {type(encoder).__name__} has no BatchNorm layer, so it keeps no running "
                              "statistics to recompute (use the default, checkpoint)")
    if not images:
        raise EvaluationError("bn_stats: no volumes to recompute the BatchNorm statistics on")
    modes = [(m, m.training) for m in encoder.modules()]
    momenta = [(m, m.momentum) for m in layers]
    try:
        encoder.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for image in images:
                encoder(image[None].to(device, non_blocking=True))
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return len(layers)


def encoder_features(encoder: nn.Module, image: torch.Tensor, device: torch.device,
                     levels: Sequence[int] = LEVELS) -> list[torch.Tensor]:
    """The encoder's maps of ``levels`` for one volume.

    Args:
        encoder: a volpre encoder (see :mod:`volpre.models.contract`), already in eval mode
            (use :func:`frozen`).
        image: ``(C, X, Y, Z)`` float, X/Y/Z multiples of 32 (a :class:`ProbeVolume` image).
        device: where to run the encoder (its parameters' device).
        levels: which of the five maps, in this order (see :func:`check_levels`).

    Returns:
        One float32 tensor ``(C_i, X/2**(i+1), Y/2**(i+1), Z/2**(i+1))`` on ``device`` per level ``i``.
    """
    maps = encoder(image[None].to(device, non_blocking=True))
    return [maps[i][0].float() for i in levels]


def features_at(maps: Sequence[torch.Tensor], points: torch.Tensor, grid_shape: Sequence[int]) -> torch.Tensor:
    """Every map trilinearly upsampled to the input grid, read at ``points``, concatenated.

    Args:
        maps: ``(C_i, X_i, Y_i, Z_i)`` maps of one volume whose input grid is ``grid_shape``
            (each map an exact integer stride of it).
        points: ``(N, 3)`` int64 voxel indices ``(x, y, z)`` of the input grid.
        grid_shape: ``(X, Y, Z)`` of the input the maps came from (the padded volume).

    Returns:
        ``(N, sum C_i)`` float32 on the maps' device, equal to
        ``cat([F.interpolate(m[None], size=grid_shape, mode="trilinear")[0, :, x, y, z] for m in maps])``.
    """
    size = torch.tensor(list(grid_shape), dtype=torch.float32, device=maps[0].device)
    # grid_sample's normalised coordinates with align_corners=False: voxel centre x -> (2x + 1)/X - 1,
    # the same for every map (each spans the same extent); the last grid axis indexes the last tensor axis
    normalised = (2.0 * points.to(size.device, torch.float32) + 1.0) / size - 1.0
    grid = normalised.flip(-1).view(1, 1, 1, -1, 3)
    columns = [
        F.grid_sample(m[None], grid, mode="bilinear", padding_mode="border", align_corners=False).view(m.shape[0], -1)
        for m in maps
    ]
    return torch.cat(columns, dim=0).T.contiguous()


def pooled_features(maps: Sequence[torch.Tensor], shape: Sequence[int], grid_shape: Sequence[int]) -> torch.Tensor:
    """Mean of each map over the part that covers the unpadded volume, concatenated.

    Args:
        maps: ``(C_i, X_i, Y_i, Z_i)`` maps of a volume padded at the far end of each axis.
        shape: ``(X, Y, Z)`` of the volume before padding.
        grid_shape: ``(X', Y', Z')`` of the padded volume the maps came from.

    Returns:
        ``(sum C_i,)`` float32 on the maps' device.
    """
    pooled = []
    for m in maps:
        extent = [-(-n // (g // ms)) for n, g, ms in zip(shape, grid_shape, m.shape[1:])]  # ceil(n / stride)
        pooled.append(m[:, : extent[0], : extent[1], : extent[2]].mean(dim=(1, 2, 3)))
    return torch.cat(pooled)
