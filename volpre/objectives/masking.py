"""Random block masks on a regular 3D grid, generated on the device, vectorised over the batch.

A mask is a bool tensor ``(B, 1, gx, gy, gz)`` on a grid of cubic cells (``True`` = masked); each
sample has exactly ``round(ratio * gx * gy * gz)`` masked cells, drawn from the caller's
``torch.Generator`` so that the same generator state gives the same masks. :func:`expand_mask`
repeats each cell to any finer resolution (voxels, patch tokens, feature maps);
:class:`VisibleAtEveryScale` keeps those expansions for SparK's sparse encoders.
:func:`random_channel_mask` masks channels instead (the disruptive autoencoder's local masking).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def masked_cell_count(grid_shape: Sequence[int], ratio: float) -> int:
    """Cells masked per sample on ``grid_shape`` at ``ratio``: ``round(ratio * cells)``."""
    return round(ratio * math.prod(grid_shape))


def mask_grid_shape(spatial_shape: Sequence[int], cell: int, ratio: float) -> tuple[int, int, int]:
    """The grid of ``cell^3`` cells tiling ``spatial_shape``, checked to leave cells masked and visible.

    Raises:
        ValueError: if ``cell`` does not divide every spatial size, or if ``ratio`` would mask no
            cell or every cell.
    """
    shape = tuple(int(size) for size in spatial_shape)
    if any(size % cell for size in shape):
        raise ValueError(f"the crop {shape} is not divisible by the mask cell edge {cell}")
    grid = tuple(size // cell for size in shape)
    masked = masked_cell_count(grid, ratio)
    if not 0 < masked < math.prod(grid):
        raise ValueError(
            f"mask ratio {ratio} on the crop {shape} ({math.prod(grid)} cells of {cell}^3) masks {masked} "
            f"of them; need at least one masked and one visible cell (use a larger crop or smaller cells)"
        )
    return grid  # type: ignore[return-value]


def random_grid_mask(
    batch_size: int, grid_shape: Sequence[int], ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """Mask exactly ``round(ratio * cells)`` random cells of each sample's grid.

    Args:
        batch_size: ``B``.
        grid_shape: ``(gx, gy, gz)`` cells per axis.
        ratio: fraction of cells to mask, in (0, 1).
        generator: source of randomness; the mask is created on ``generator.device``.

    Returns:
        ``(B, 1, gx, gy, gz)`` bool on ``generator.device``, ``True`` where masked.

    Raises:
        ValueError: if the ratio would mask no cell or every cell of the grid.
    """
    grid = tuple(int(size) for size in grid_shape)
    cells = math.prod(grid)
    masked = masked_cell_count(grid, ratio)
    if not 0 < masked < cells:
        raise ValueError(
            f"mask ratio {ratio} on a grid of {cells} cells {grid} masks {masked} of them; "
            f"need at least one masked and one visible cell (use a larger crop or smaller cells)"
        )
    scores = torch.rand(batch_size, cells, generator=generator, device=generator.device)
    rank = scores.argsort(dim=1).argsort(dim=1)  # rank of each cell's score within its sample
    return (rank < masked).view(batch_size, 1, *grid)


def expand_mask(mask: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Repeat each grid cell of ``mask`` to fill ``spatial_shape``.

    Args:
        mask: ``(B, K, gx, gy, gz)`` of any dtype.
        spatial_shape: ``(X, Y, Z)``, each an integer multiple of the grid size on its axis.

    Returns:
        ``(B, K, X, Y, Z)``, same dtype and device; cell ``(i, j, k)`` covers voxels
        ``[i*X/gx, (i+1)*X/gx)`` x ... .
    """
    batch, channels, *grid = mask.shape
    shape = tuple(int(size) for size in spatial_shape)
    if len(grid) != 3 or len(shape) != 3 or any(s % g for s, g in zip(shape, grid)):
        raise ValueError(f"cannot expand a mask grid {tuple(grid)} to spatial shape {shape}: need integer multiples")
    fx, fy, fz = (s // g for s, g in zip(shape, grid))
    gx, gy, gz = grid
    tiled = mask[:, :, :, None, :, None, :, None].expand(batch, channels, gx, fx, gy, fy, gz, fz)
    return tiled.reshape(batch, channels, *shape)


class VisibleAtEveryScale:
    """A SparK mask's visible cells at the resolution of any feature map (SparK's sparse execution:
    every layer's output is re-zeroed where the input was masked). Each shape is expanded once.

    Args:
        visible_grid: bool ``(B, 1, gx, gy, gz)``, ``True`` = visible.
    """

    def __init__(self, visible_grid: torch.Tensor) -> None:
        self.visible_grid = visible_grid
        self._by_shape: dict[tuple[int, ...], torch.Tensor] = {}

    def visible(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, 1, X, Y, Z)`` bool for a feature map ``t`` ``(B, C, X, Y, Z)``."""
        shape = tuple(t.shape[2:])
        if shape not in self._by_shape:
            self._by_shape[shape] = expand_mask(self.visible_grid, shape)
        return self._by_shape[shape]

    def zero_masked(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` with its masked positions set to 0."""
        return t * self.visible(t).to(t.dtype)


def masked_channel_count(channels: int, ratio: float) -> int:
    """Channels masked per sample at ``ratio``: ``floor(ratio * channels)`` (the DAE code's ``int(0.6 * C)``)."""
    return int(ratio * channels)


def random_channel_mask(batch_size: int, channels: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Mask exactly ``floor(ratio * channels)`` random channels of each sample.

    Args:
        batch_size: ``B``.
        channels: ``C``.
        ratio: fraction of channels to mask, in (0, 1).
        generator: source of randomness; the mask is created on ``generator.device``.

    Returns:
        ``(B, C)`` bool on ``generator.device``, ``True`` where masked.

    Raises:
        ValueError: if the ratio would mask no channel or every channel.
    """
    masked = masked_channel_count(channels, ratio)
    if not 0 < masked < channels:
        raise ValueError(
            f"channel mask ratio {ratio} of {channels} channels masks {masked} of them; "
            "need at least one masked and one kept channel"
        )
    scores = torch.rand(batch_size, channels, generator=generator, device=generator.device)
    return scores.argsort(dim=1).argsort(dim=1) < masked
