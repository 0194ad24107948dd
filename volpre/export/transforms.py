"""The deterministic transforms of every bundle: volpre's preprocessing, then CT window and padding.

Pretraining and fine-tuning share one preprocessing path; only the CT intensity window may
differ (a bundle's ``ct_window`` key, set by ``volpre export --ct-window``), as in MONAI's
Swin UNETR BTCV recipe, which pretrains at [-1000, 1000] HU and fine-tunes at [-175, 250] HU.
:func:`deterministic_transforms` returns, as one flat list (so that MONAI's ``CacheDataset``
caches all of it: it stops caching at the first randomizable transform, and a nested ``Compose``
counts as one):

1. :func:`volpre.data.transforms.preprocess_transforms` (volpre's checked reader, RAS, spacing,
   foreground crop; MR clipped and z-scored over the foreground);
2. what the pretraining crop stage does to crops, done to whole volumes: CT clipped to the
   fine-tuning HU window (by default the pretraining one) and scaled to [0, 1]
   (:func:`volpre.data.transforms.window_transform`), and padding up to the crop size, so the
   random crops that follow are always full-size (CT image with 0 = the window's lower bound;
   MR image by repeating its border; labels with 0);
3. dropping ``series_uid`` (only DICOM records have it; records with and without it could not
   be collated into one batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from monai.transforms import DeleteItemsd, Lambdad, MapTransform, SpatialPadd

from volpre.config import ConfigError, PreprocessConfig
from volpre.data.transforms import check_modality, preprocess_transforms, window_transform


def deterministic_transforms(
    preprocess: PreprocessConfig, modality: str, roi_size: Sequence[int], with_label: bool = False,
    ct_window: Sequence[float] | None = None,
) -> list[MapTransform]:
    """The cached part of a bundle's pipeline, as a flat list of dictionary transforms.

    Args:
        preprocess: the pretraining preprocessing config (the bundle's ``preprocess`` key).
        modality: ``"CT"`` or ``"MR"``.
        roi_size: the smallest spatial size to pad to, ``(X, Y, Z)`` voxels.
        with_label: also read, resample, crop and pad the ``label`` volume (nearest neighbour, 0-padded).
        ct_window: the fine-tuning CT window ``[low, high]`` in HU (the bundle's ``ct_window`` key);
            ``None``: ``preprocess.ct_window``, the pretraining window. Unused for MR.

    Input: a record ``{"image": path(s), ["series_uid": uid], ["label": path], ...}``.
    Output ``image``: MetaTensor float32 ``(C, max(X', rx), ...)`` in RAS at the target spacing,
    CT in [0, 1], MR z-scores; ``label``: float32 ``(1, ...)`` class indices on the same grid.

    Raises:
        VolumeError: ``modality`` has no preset.
        ConfigError: ``ct_window`` is not ``[low, high]`` with ``low < high``.
    """
    check_modality(modality, "bundle modality")
    if ct_window is not None:
        preprocess = dataclasses.replace(preprocess, ct_window=check_ct_window(ct_window, "bundle ct_window"))
    transforms: list[MapTransform] = list(preprocess_transforms(preprocess, modality, with_label=with_label).transforms)
    window = window_transform(preprocess, modality)
    if window is not None:
        transforms.append(Lambdad("image", func=window))
        transforms.append(SpatialPadd("image", spatial_size=roi_size, mode="constant", value=0.0))
    else:
        transforms.append(SpatialPadd("image", spatial_size=roi_size, mode="replicate"))
    if with_label:
        transforms.append(SpatialPadd("label", spatial_size=roi_size, mode="constant", value=0))
    transforms.append(DeleteItemsd("series_uid"))
    return transforms


def check_ct_window(ct_window: Sequence[float], what: str) -> tuple[float, float]:
    """``(low, high)`` as floats; raise ConfigError naming ``what`` unless it is two numbers with ``low < high``."""
    try:
        low, high = (float(v) for v in ct_window)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be [low, high] in HU, got {ct_window!r}") from None
    if not low < high:
        raise ConfigError(f"{what} must be [low, high] in HU with low < high, got {[low, high]}")
    return low, high
