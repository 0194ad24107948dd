"""MONAI preprocessing presets, per modality, built from :class:`volpre.config.PreprocessConfig`.

A volume goes through two stages:

1. **Deterministic** (:func:`preprocess_transforms`; run once per volume and cached):
   read with volpre's checked reader (RAS, HU for CT) -> resample to ``spacing`` (labels with
   nearest neighbour; MONAI's ``Spacingd`` grid and trace, computed by separable interpolation:
   :mod:`volpre.data.resample`) -> crop to the foreground -> MR only: clip to intensity percentiles and
   z-score over the foreground. CT stays in Hounsfield units here, so a cache can hold int16.
2. **Random** (every visit): pad to the crop size -> ``crops_per_volume`` random crops -> CT
   only: clip to the HU window and scale to [0, 1] (:class:`CropWindow`, on the training device:
   crops travel between processes as float16 intensities). It comes in two halves, so that a cache can
   cut the very same crops without loading a whole volume: :func:`draw_crop_starts` draws the
   corners (a pure function of the generator it is given, distributed as MONAI's
   ``RandSpatialCropSamplesd`` draws them), :func:`crops_at` cuts them from a whole volume with
   MONAI's ``SpatialPadd`` (``volpre.data.cache`` reads them from disk instead).

Output of stage 2 per crop: float16 ``(C, *roi)`` from the workers (CT in HU, MR z-scores), float32
after :class:`CropWindow` on the device (CT in [0, 1], MR z-scores, roughly [-3, 5]).

The deterministic preset is a MONAI ``Compose``, so bundle configs and user code use it as they
use any MONAI transform (the bundles do: ``volpre.export.transforms``).
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import convert_to_tensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    MapTransform,
    ScaleIntensityRange,
    SpatialPadd,
)

from volpre.config import DataConfig, PreprocessConfig
from volpre.data.errors import VolumeError
from volpre.data.readers import read_volume
from volpre.data.resample import AxisAlignedSpacingd

SUPPORTED_MODALITIES = ("CT", "MR")
CT_FOREGROUND_HU = -500.0
"""CT voxels above this HU value are body (foreground); air and the table's cushion are below."""
MR_FOREGROUND_FRACTION = 0.05
"""MR voxels above this fraction of the 99th intensity percentile are foreground."""
GRID_ATOL_MM = 1e-3


def check_modality(modality: str | None, where: str) -> str:
    """Return the modality if volpre has a preset for it, else raise naming the entry."""
    if modality not in SUPPORTED_MODALITIES:
        found = "no modality" if modality is None else f"modality {modality!r}"
        raise VolumeError(
            where,
            "modality",
            f"{found}; preprocessing presets exist for {', '.join(SUPPORTED_MODALITIES)} "
            "(set 'modality' in the manifest, or use `volpre index --modality`)",
        )
    return modality


class LoadVolumed(MapTransform):
    """Read ``image`` (one path, or a list of paths stacked as channels) and optional ``label``.

    Uses :func:`volpre.data.readers.read_volume`, so every integrity check applies (truncation,
    non-finite voxels, dimensionality, DICOM series checks). A label must lie on the image's
    voxel grid (same shape and affine) and hold integer class values.

    Output: ``image`` MetaTensor float32 ``(C, X, Y, Z)`` in RAS; ``label`` MetaTensor float32
    ``(1, X, Y, Z)``.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", series_uid_key: str = "series_uid"):
        super().__init__([image_key, label_key], allow_missing_keys=True)
        self.image_key, self.label_key, self.series_uid_key = image_key, label_key, series_uid_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        paths = d[self.image_key]
        paths = [paths] if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence) else list(paths)
        series_uid = d.get(self.series_uid_key)
        channels = [read_volume(paths[0], series_uid=series_uid)]
        for path in paths[1:]:
            channel = read_volume(path, series_uid=series_uid)
            check_same_grid(channels[0], channel, str(path), f"channel 0 ({paths[0]})")
            channels.append(channel)
        image = channels[0] if len(channels) == 1 else torch.cat(channels, dim=0)
        d[self.image_key] = image
        label_path = d.get(self.label_key)
        if label_path is not None:
            label = read_volume(label_path)
            check_same_grid(image, label, str(label_path), f"its image ({paths[0]})")
            check_label_values(label, str(label_path))
            d[self.label_key] = label
        return d


def check_same_grid(reference: MetaTensor, other: MetaTensor, other_path: str, reference_name: str) -> None:
    """Raise ``VolumeError(kind="grid-mismatch")`` unless both lie on one voxel grid (shape and affine)."""
    if tuple(reference.shape[1:]) != tuple(other.shape[1:]) or not np.allclose(
        np.asarray(reference.affine), np.asarray(other.affine), atol=GRID_ATOL_MM
    ):
        raise VolumeError(
            other_path,
            "grid-mismatch",
            f"voxel grid {tuple(other.shape[1:])} with affine {np.asarray(other.affine).round(3).tolist()} "
            f"differs from {reference_name}: {tuple(reference.shape[1:])} with affine "
            f"{np.asarray(reference.affine).round(3).tolist()}",
        )


def check_label_values(label: torch.Tensor, path: str) -> None:
    """Raise ``VolumeError(kind="label")`` unless every voxel is a class index 0, 1, 2, ..."""
    if not torch.equal(label, torch.round(label)) or bool((label < 0).any()):
        raise VolumeError(path, "label", "label holds negative or non-integer values; expected class indices 0, 1, 2, ...")


class CTForeground:
    """Foreground selector for ``CropForegroundd``: CT voxels above -500 HU (body)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image > CT_FOREGROUND_HU


class MRForeground:
    """Foreground selector: MR voxels above 5% of the volume's 99th intensity percentile."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = torch.as_tensor(image)
        threshold = MR_FOREGROUND_FRACTION * torch.quantile(_subsample(image.float()), 0.99)
        return image > threshold


def _subsample(values: torch.Tensor, max_values: int = 1 << 20) -> torch.Tensor:
    """A flat view of at most ~``max_values`` evenly strided values (torch.quantile has a size cap)."""
    flat = values.reshape(-1)
    step = max(1, flat.numel() // max_values)
    return flat[::step]


class ForegroundZScored(MapTransform):
    """MR intensity normalisation: clip the foreground to its percentiles, then z-score it.

    Foreground as in :class:`MRForeground`, per channel. Only foreground voxels are clipped (so
    the background stays darker than any tissue); afterwards the foreground has mean 0 and
    standard deviation 1 and the background lies below it.
    """

    def __init__(self, keys: Sequence[str], percentiles: tuple[float, float]):
        super().__init__(keys)
        self.low, self.high = percentiles[0] / 100.0, percentiles[1] / 100.0

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            out = torch.empty_like(image)
            for c in range(image.shape[0]):
                channel = image[c]
                mask = MRForeground()(channel)
                if not bool(mask.any()):
                    mask = torch.ones_like(mask)
                lo, hi = torch.quantile(_subsample(channel[mask].float()), torch.tensor([self.low, self.high]))
                clipped = torch.where(mask, channel.clamp(lo, hi), channel)
                foreground = clipped[mask]
                out[c] = (clipped - foreground.mean()) / foreground.std().clamp_min(1e-6)
            d[key] = out
        return d


def preprocess_transforms(cfg: PreprocessConfig, modality: str, with_label: bool = False) -> Compose:
    """The deterministic stage for one modality (see module docstring).

    Input: a dict with ``image`` (path or list of paths), optionally ``series_uid`` and, when
    ``with_label``, ``label``. Output: ``image`` MetaTensor float32 ``(C, X', Y', Z')`` on the
    target spacing (CT in HU, MR z-scored), ``label`` float32 ``(1, X', Y', Z')``.
    """
    check_modality(modality, "preset")
    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    transforms: list = [
        LoadVolumed(),
        AxisAlignedSpacingd(keys, pixdim=cfg.spacing, mode=modes, padding_mode="border", dtype=np.float32),
    ]
    if cfg.crop_foreground:
        selector = CTForeground() if modality == "CT" else MRForeground()
        transforms.append(CropForegroundd(keys, source_key="image", select_fn=selector, margin=2, allow_smaller=True))
    if modality == "MR":
        transforms.append(ForegroundZScored(["image"], cfg.mr_percentiles))
    return Compose(transforms)


def _pad_transforms(preprocess: PreprocessConfig, data: DataConfig, modality: str, with_label: bool) -> list:
    """Pad to ``data.roi`` (symmetrically): CT image with the window's lower bound (air), MR image by
    repeating its border (background), labels with 0."""
    if modality == "CT":
        low = preprocess.ct_window[0]
        transforms: list = [SpatialPadd(["image"], spatial_size=data.roi, mode="constant", value=low)]
    else:
        transforms = [SpatialPadd(["image"], spatial_size=data.roi, mode="replicate")]
    if with_label:
        transforms.append(SpatialPadd(["label"], spatial_size=data.roi, mode="constant", value=0))
    return transforms


def window_transform(preprocess: PreprocessConfig, modality: str) -> ScaleIntensityRange | None:
    """The intensity step that follows a crop: CT clipped to ``ct_window`` and scaled to [0, 1];
    ``None`` for MR (z-scored in the deterministic stage)."""
    if modality != "CT":
        return None
    low, high = preprocess.ct_window
    return ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)


# ----------------------------------------------------------------------------- crops at drawn corners


def padding_before(shape: Sequence[int], roi: Sequence[int]) -> np.ndarray:
    """Voxels the random stage pads before each axis: ``max(roi - shape, 0) // 2`` (MONAI's
    symmetric ``SpatialPad``), int64 ``(3,)``."""
    return np.maximum(np.asarray(roi, dtype=np.int64) - np.asarray(shape, dtype=np.int64), 0) // 2


def draw_crop_starts(shape: Sequence[int], roi: Sequence[int], count: int, rng: np.random.Generator) -> np.ndarray:
    """Corners of ``count`` random crops, drawn as ``RandSpatialCropSamplesd`` draws them.

    Args:
        shape: spatial shape ``(X, Y, Z)`` of the preprocessed volume (before padding).
        roi: crop size ``(X, Y, Z)``.
        count: number of crops.
        rng: the only source of randomness (so crops are a pure function of its seed).

    Returns:
        int64 ``(count, 3)``: each crop's first voxel in the volume padded to ``roi`` as the
        random stage pads it (so every value lies in ``[0, max(shape, roi) - roi]``).
    """
    padded = np.maximum(np.asarray(shape, dtype=np.int64), np.asarray(roi, dtype=np.int64))
    high = padded - np.asarray(roi, dtype=np.int64) + 1
    return rng.integers(0, high, size=(count, 3), dtype=np.int64)


CROP_DTYPE = torch.float16
"""dtype of crops between the DataLoader's processes: half the bytes of float32 through shared
memory. Exact for the cache's int16 CT HU within [-2048, 2048] (beyond, steps of 2 HU up to 4096)
and for its float16 MR; on-the-fly crops of float32 HU round by at most 0.25 HU within
[-1024, 1024] (the cache rounds by 0.5)."""


def crops_at(volume: torch.Tensor, starts: np.ndarray, preprocess: PreprocessConfig, data: DataConfig,
             modality: str) -> list[torch.Tensor]:
    """Cut crops at given corners from a whole preprocessed volume, as the random stage does.

    The volume is padded with MONAI's ``SpatialPadd`` (CT with the window's lower bound, i.e. air;
    MR by repeating its border) and each ``data.roi`` crop is cut at its corner (from
    :func:`draw_crop_starts`). The CT window follows on the training device (:class:`CropWindow`).

    Args:
        volume: ``(C, X, Y, Z)`` output of :func:`preprocess_transforms` (CT in HU, MR z-scored).
        starts: int ``(N, 3)`` corners in padded coordinates.

    Returns:
        ``N`` plain :data:`CROP_DTYPE` tensors (not MetaTensors) ``(C, *roi)``: CT in HU, MR z-scores.
    """
    check_modality(modality, "preset")
    padded = Compose(_pad_transforms(preprocess, data, modality, with_label=False))({"image": volume})["image"]
    padded = convert_to_tensor(padded, track_meta=False)
    rx, ry, rz = data.roi
    return [padded[:, x : x + rx, y : y + ry, z : z + rz].to(CROP_DTYPE).contiguous()
            for x, y, z in np.asarray(starts, dtype=np.int64).tolist()]


class CropWindow:
    """The intensity step after the crop, applied to a batch on the training device.

    Crops travel from the DataLoader's workers as :data:`CROP_DTYPE` intensities (CT in HU, MR
    z-scores, or an nnU-Net plan's normalised values); here they become float32, and the CT crops
    of the batch are clipped to ``ct_window`` and scaled to [0, 1] with MONAI's
    ``ScaleIntensityRange`` (:func:`window_transform`, the same arithmetic as before the crops
    left the workers). With an nnU-Net plan nothing is windowed (the cache holds normalised values).

    Args:
        preprocess: the run's preprocessing (``ct_window``).
        modality_classes: the names of ``batch["modality"]``'s ids
            (:attr:`volpre.data.dataset.VolumeGroups.modality_classes`: ``CT``, ``MR``, ``MR/T2``, ...).
        windowed: False for an nnU-Net plan's cache.
    """

    def __init__(self, preprocess: PreprocessConfig, modality_classes: Sequence[str], windowed: bool = True):
        self.window = window_transform(preprocess, "CT")
        self.is_ct = torch.tensor([windowed and name.split("/")[0] == "CT" for name in modality_classes])

    def __call__(self, image: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """``image`` ``(B, C, X, Y, Z)`` crops on any device, ``modality`` ``(B,)`` class ids on the
        host (so that choosing the crops to window never waits for the device) -> float32
        ``(B, C, X, Y, Z)`` on ``image``'s device."""
        image = image.float()
        is_ct = self.is_ct[modality.cpu().long()]
        if not bool(is_ct.any()):
            return image
        windowed = convert_to_tensor(self.window(image), track_meta=False)
        if bool(is_ct.all()):
            return windowed
        mask = is_ct.to(image.device, non_blocking=True).view(-1, *([1] * (image.dim() - 1)))
        return torch.where(mask, windowed, image)
