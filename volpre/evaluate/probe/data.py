"""The volumes a probe reads: a labelled manifest's ``train`` and ``val`` entries, preprocessed as the
encoder saw them in pretraining.

Which entries: :func:`volpre.evaluate.sampling.select_evaluation_data` (the rules of the
label-efficiency evaluation: labelled entries of one modality, ``train`` to fit the probe's head,
``val`` to score it, no subject in both), then at most ``max_entries`` of each split in manifest
order.

Preprocessing is the pretraining run's own ``preprocess`` config
(:func:`volpre.data.transforms.preprocess_transforms`: checked read, RAS, spacing, foreground crop,
MR z-score; labels resampled nearest-neighbour onto the same grid), then the CT window that
pretraining applies to its crops (:func:`volpre.data.transforms.window_transform`), and padding at
the far end of each axis up to a multiple of 32 (the encoders' total stride; CT with 0 = the
window's lower bound, i.e. air; MR by repeating its border, as pretraining pads). The whole
volume goes through the encoder at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
from monai.transforms import DivisiblePad
from monai.utils import convert_to_tensor

from volpre.config import PreprocessConfig
from volpre.data.manifest import ManifestEntry
from volpre.data.transforms import preprocess_transforms, window_transform
from volpre.evaluate.errors import EvaluationError
from volpre.evaluate.sampling import Task, has_comparable_pair, select_evaluation_data
from volpre.models import FEATURE_STRIDES

TOTAL_STRIDE = FEATURE_STRIDES[-1]
"""Every padded volume's spatial size is a multiple of this (the encoders downsample 5 times by 2)."""


@dataclass(frozen=True)
class ProbeVolume:
    """One preprocessed entry, held on the CPU."""

    entry: ManifestEntry
    image: torch.Tensor
    """``(C, X', Y', Z')`` float32: CT windowed to [0, 1], MR z-scores; ``X' >= X`` the next multiple of
    32, padded at the far end (so voxel ``(x, y, z)`` of the volume is voxel ``(x, y, z)`` here)."""
    shape: tuple[int, int, int]
    """``(X, Y, Z)``: the preprocessed volume's size before padding."""
    label: torch.Tensor | None
    """Segmentation: ``(X, Y, Z)`` int64 class indices on the volume's grid (not padded); else None."""


@dataclass(frozen=True)
class ProbeData:
    """What one probe fits on (``train``) and scores on (``val``)."""

    task: Task
    modality: str
    train: tuple[ProbeVolume, ...]
    val: tuple[ProbeVolume, ...]
    num_classes: int
    """Segmentation: classes including background (1 + the largest label value of both splits); survival: 0."""
    covariates: tuple[str, ...]
    """Survival: names of the covariates every entry of both splits carries (used beside the image
    features); empty otherwise."""


def _pad(modality: str) -> DivisiblePad:
    if modality == "CT":
        return DivisiblePad(k=TOTAL_STRIDE, method="end", mode="constant", value=0.0)
    return DivisiblePad(k=TOTAL_STRIDE, method="end", mode="replicate")


def load_volume(entry: ManifestEntry, preprocess: PreprocessConfig, modality: str, with_label: bool) -> ProbeVolume:
    """Read and preprocess one entry (see the module docstring).

    Raises:
        VolumeError: the image or label cannot be read, fails its checks, or does not lie on one grid.
    """
    record = entry.to_record()
    if not with_label:
        record.pop("label", None)
    item = preprocess_transforms(preprocess, modality, with_label=with_label)(record)
    image = convert_to_tensor(item["image"], track_meta=False).float()
    window = window_transform(preprocess, modality)
    if window is not None:
        image = convert_to_tensor(window(image), track_meta=False)
    shape = tuple(int(s) for s in image.shape[1:])
    padded = convert_to_tensor(_pad(modality)(image), track_meta=False).float().contiguous()
    label = None
    if with_label:
        label = convert_to_tensor(item["label"], track_meta=False)[0].round().long().contiguous()
    return ProbeVolume(entry=entry, image=padded, shape=shape, label=label)  # type: ignore[arg-type]


def _check_survival_val(val: list[ManifestEntry], where: str) -> None:
    if not has_comparable_pair(val):
        raise EvaluationError(
            f"{where}: the {len(val)} probed entries of split 'val' have no comparable pair (events "
            f"{sum(int(e.event) for e in val)}), so no C-index can be computed; raise max_entries or add val "
            "subjects with events"
        )


def _shared_covariates(entries: list[ManifestEntry]) -> tuple[str, ...]:
    names = None
    for entry in entries:
        own = set(entry.covariates or {})
        names = own if names is None else names & own
    return tuple(sorted(names or ()))


def load_probe_data(
    manifest: str | os.PathLike[str],
    task: Task,
    modality: Literal["CT", "MR"],
    preprocess: PreprocessConfig,
    in_channels: int,
    max_entries: int | None = None,
) -> ProbeData:
    """Select, read and preprocess a probe's entries.

    Args:
        manifest: a volpre manifest with labelled ``train`` and ``val`` entries.
        task: ``"segmentation"`` (entries with a ``label``) or ``"survival"`` (``time`` and ``event``).
        modality: only entries of this modality are used.
        preprocess: the pretraining run's preprocessing (the encoder saw volumes preprocessed so).
        in_channels: the encoder's input channels; every image must have that many.
        max_entries: at most this many entries of each split, in manifest order (None: all).

    Raises:
        ManifestError: the manifest cannot be read.
        EvaluationError: no labelled entries of ``modality`` in ``train`` or ``val``, subjects in
            both splits, too few training subjects (survival: 2), no comparable pair in ``val``
            (survival), labels that hold only background in ``train`` (segmentation), or images
            whose channels differ from ``in_channels``.
        VolumeError: an image or label cannot be read or fails its checks.
    """
    if max_entries is not None and (isinstance(max_entries, bool) or max_entries < 1):
        raise EvaluationError(f"max_entries: got {max_entries!r}, expected an integer >= 1")
    chosen = select_evaluation_data(manifest, task, modality)
    train = list(chosen.train[:max_entries])
    val = list(chosen.val[:max_entries])
    if task == "survival":
        if len({e.subject_or_id for e in train}) < 2:
            raise EvaluationError(
                f"manifest {manifest}: the {len(train)} probed entries of split 'train' belong to one subject; a "
                "Cox model compares subjects: raise max_entries (at least 2 subjects)"
            )
        _check_survival_val(val, f"manifest {manifest}")
    with_label = task == "segmentation"
    volumes = {split: tuple(load_volume(e, preprocess, modality, with_label) for e in entries)
               for split, entries in (("train", train), ("val", val))}
    for volume in (*volumes["train"], *volumes["val"]):
        if volume.image.shape[0] != in_channels:
            raise EvaluationError(
                f"entry {volume.entry.id}: image has {volume.image.shape[0]} channels, the encoder takes "
                f"{in_channels} (model.in_channels)"
            )
    num_classes = 0
    if with_label:
        largest = {split: max(int(v.label.max()) for v in vols) for split, vols in volumes.items()}
        if largest["train"] == 0:
            raise EvaluationError(
                f"manifest {manifest}: the labels of the {len(train)} probed {modality} entries of split 'train' "
                "hold only background (0) after preprocessing; a segmentation probe needs foreground classes"
            )
        num_classes = 1 + max(largest.values())
    covariates = _shared_covariates(train + val) if task == "survival" else ()
    return ProbeData(task=task, modality=modality, train=volumes["train"], val=volumes["val"],
                     num_classes=num_classes, covariates=covariates)
