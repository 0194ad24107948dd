"""MONAI's ``Spacingd`` with a separable resampling kernel: same grid, same affine, same trace.

MONAI's ``Spacing`` keeps the input's orientation and only changes the voxel size
(``monai.data.utils.zoom_affine`` with ``diagonal=False``). For an input affine ``A = M diag(d)``
(any invertible direction part ``M``, columns scaled by the spacing ``d``) the output affine is
``A' = M diag(d')`` with MONAI's offset, so the map from output to input voxel indices,
``A^-1 A'``, is a per-axis scale ``d'/d`` plus a shift, for oblique and anisotropic inputs alike.
MONAI still resamples through ``grid_sample`` over a dense 3-D grid (about 1.4 s for a
256x256x200 CT on one core). Interpolation that is separable along the axes does the same work in
three 1-D passes (two gathers and a weighted sum per axis), several times faster.

:class:`AxisAlignedSpacingd` is ``monai.transforms.Spacingd`` whose resampler
(:class:`AxisAlignedResample`, a ``SpatialResample``) lets MONAI compute everything but the voxel
values: it calls MONAI's resampling lazily (output shape, affine, metadata and the trace that
``Invertd`` reads come from MONAI), then fills in the values with :func:`resample_separable` and
records the operation as applied, as MONAI's own ``apply_pending`` does. MONAI's eager path runs
instead whenever the fast one does not apply: a voxel map that is not diagonal, an interpolation
mode other than ``bilinear``/``nearest``, a padding mode other than ``border``,
``align_corners=True``, a lazy call, or an input that is not a MetaTensor.

Values: ``bilinear`` is MONAI's trilinear interpolation with border padding (differences are
floating-point rounding: the index map is computed here in float64, MONAI's grid in the
resampling dtype); ``nearest`` takes the nearest input voxel (``torch.round``: ties to even, as
``grid_sample``; where an output voxel lies within rounding error of halfway between two input
voxels, the two may pick different neighbours).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Spacingd, SpatialResample
from monai.utils import LazyAttr, TraceKeys, get_equivalent_dtype

FAST_MODES = ("bilinear", "nearest")
DIAGONAL_ATOL = 1e-6
"""Off-diagonal terms of the output->input voxel map below this are treated as 0 (the map of
``Spacing`` is diagonal up to float64 rounding, about 1e-15)."""


def resample_separable(image: torch.Tensor, scale: Sequence[float], shift: Sequence[float],
                       shape: Sequence[int], mode: str) -> torch.Tensor:
    """Resample ``image`` on the grid ``x_in = scale * x_out + shift`` (per axis, voxel indices).

    Args:
        image: ``(C, X, Y, Z)`` any float dtype, on any device.
        scale, shift: per spatial axis, the output->input voxel index map.
        shape: ``(X', Y', Z')`` output spatial shape.
        mode: ``"bilinear"`` (linear along each axis, i.e. trilinear) or ``"nearest"``; indices
            outside the input are clamped to its border (``grid_sample``'s ``padding_mode="border"``).

    Returns:
        ``(C, X', Y', Z')`` in ``image``'s dtype.
    """
    if mode not in FAST_MODES:
        raise ValueError(f"mode must be one of {FAST_MODES}, got {mode!r}")
    out = image
    for axis, (s, t, n_out) in enumerate(zip(scale, shift, shape)):
        dim = axis + 1
        n_in = out.shape[dim]
        position = np.clip(np.arange(n_out, dtype=np.float64) * s + t, 0.0, n_in - 1)
        along = (slice(None),) * dim  # an index tensor after these selects along `dim`
        if mode == "nearest":
            out = out[along + (torch.as_tensor(np.round(position).astype(np.int64), device=out.device),)]
            continue
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, n_in - 1)
        weight_shape = [1] * out.ndim
        weight_shape[dim] = n_out
        weight = torch.as_tensor(position - low, dtype=out.dtype, device=out.device).reshape(weight_shape)
        below = out[along + (torch.as_tensor(low, device=out.device),)]
        above = out[along + (torch.as_tensor(high, device=out.device),)]
        out = torch.lerp(below, above, weight)
    return out


def _axis_map(xform: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(scale, shift)`` of a ``(4, 4)`` output->input voxel map, or None unless it is diagonal."""
    linear = xform[:3, :3]
    if not np.allclose(linear, np.diag(np.diag(linear)), rtol=0.0, atol=DIAGONAL_ATOL):
        return None
    return np.diag(linear).copy(), xform[:3, 3].copy()


class AxisAlignedResample(SpatialResample):
    """``SpatialResample`` that resamples axis-aligned voxel maps with :func:`resample_separable`
    (see the module docstring for when MONAI's own path runs instead)."""

    def __call__(self, img: torch.Tensor, dst_affine: torch.Tensor | None = None,
                 spatial_size: Sequence[int] | torch.Tensor | int | None = None, mode: str | None = None,
                 padding_mode: str | None = None, align_corners: bool | None = None, dtype=None,
                 lazy: bool | None = None) -> torch.Tensor:
        eager = dict(dst_affine=dst_affine, spatial_size=spatial_size, mode=mode, padding_mode=padding_mode,
                     align_corners=align_corners, dtype=dtype)
        lazy_ = self.lazy if lazy is None else lazy
        if lazy_ or not isinstance(img, MetaTensor) or img.pending_operations or img.ndim != 4:
            return super().__call__(img, lazy=lazy, **eager)
        planned = super().__call__(img, lazy=True, **eager)
        operation = dict(planned.pending_operations[-1])
        settings = operation[TraceKeys.EXTRA_INFO]
        axis_map = _axis_map(np.asarray(operation[LazyAttr.AFFINE], dtype=np.float64))
        unchanged = (np.allclose(operation[LazyAttr.AFFINE], np.eye(4), rtol=0.0, atol=DIAGONAL_ATOL)
                     and tuple(operation[LazyAttr.SHAPE]) == tuple(img.shape[1:]))
        if (unchanged or axis_map is None or settings["mode"] not in FAST_MODES or settings["padding_mode"] != "border"
                or settings["align_corners"] not in (False, TraceKeys.NONE)):
            return super().__call__(img, lazy=False, **eager)
        shape = [int(n) for n in operation.pop(LazyAttr.SHAPE)]
        operation.pop(LazyAttr.AFFINE)
        operation[TraceKeys.LAZY] = False  # the trace MONAI's eager call leaves
        compute_dtype = get_equivalent_dtype(settings["dtype"], torch.Tensor)
        values = resample_separable(img.as_tensor().to(compute_dtype), *axis_map, shape, settings["mode"])
        out = MetaTensor(values.to(torch.float32), meta=planned.meta,
                         applied_operations=list(planned.applied_operations))
        out.affine = torch.as_tensor(planned.peek_pending_affine(), dtype=torch.float64)
        out.push_applied_operation(operation)
        return out


class AxisAlignedSpacingd(Spacingd):
    """``monai.transforms.Spacingd`` (same arguments, grid, affine and trace) with
    :class:`AxisAlignedResample` as its resampler."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        monai_resample = self.spacing_transform.sp_resample
        self.spacing_transform.sp_resample = AxisAlignedResample(
            mode=monai_resample.mode, padding_mode=monai_resample.padding_mode,
            align_corners=monai_resample.align_corners, dtype=monai_resample.dtype, lazy=monai_resample.lazy)
