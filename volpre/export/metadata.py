"""A bundle's ``configs/metadata.json``: the template's text plus versions, data format and provenance.

The template (``bundles/<task>/configs/metadata.json``) holds the fixed text (task, intended use,
references). :func:`fill_metadata` adds what only the export knows:

- the exact installed versions: ``monai_version``, ``pytorch_version``, ``numpy_version``, and
  ``required_packages_version`` with monai, torch, numpy, volpre and the other packages the
  bundle's components import;
- ``network_data_format`` (``inputs.image``, ``outputs.pred``; read by ``verify_net_in_out``);
- a ``changelog`` entry naming the checkpoint, and ``volpre_pretraining`` (objective, steps,
  the checkpoint's and the pretraining manifest's file names and SHA-256 digests, encoder config,
  preprocessing with its CT window, the versions pretraining ran with);
- ``volpre_finetuning``: the intensity window fine-tuning and inference apply (``ct_window`` in
  HU, CT only; ``null`` for MR), beside the pretraining one (``pretraining_ct_window``).

Provenance is file names and digests (:class:`Provenance`), never local paths: bundles are made
to be shared, and the folders of hospital archives often carry patient names or record numbers.

The result validates against MONAI's meta schema 20240725 (:mod:`volpre.export.schema`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from volpre import __version__
from volpre.files import file_sha256
from volpre.export.source import PretrainedEncoder

BUNDLE_PACKAGES = ("monai", "torch", "numpy", "pytorch-ignite", "nibabel", "pydicom", "SimpleITK", "einops",
                   "tensorboard")
"""Packages a bundle needs besides volpre (each with its exact installed version)."""


def installed_package_versions() -> dict[str, str]:
    """``{"monai": "1.6.1", "torch": ..., "volpre": ...}`` for :data:`BUNDLE_PACKAGES` and volpre.

    Raises:
        PackageNotFoundError: a required package is not installed (the bundle could not run).
    """
    versions = {name: version(name) for name in BUNDLE_PACKAGES}
    versions["volpre"] = __version__
    return versions


@dataclass(frozen=True)
class Provenance:
    """Where the exported weights come from, as file names and SHA-256 digests (no paths)."""

    checkpoint: dict[str, str]
    """``{"file": "last.pt", "sha256": ...}`` of the checkpoint file exported."""
    manifest: dict[str, str]
    """``{"file": "archive.json", "sha256": ...}`` of the pretraining manifest; ``{}`` if the
    checkpoint records none."""

    @classmethod
    def of(cls, pretrained: PretrainedEncoder) -> Provenance:
        recorded = pretrained.manifest or {}
        manifest = {}
        if recorded.get("path"):
            manifest["file"] = Path(str(recorded["path"])).name
        if recorded.get("sha256"):
            manifest["sha256"] = str(recorded["sha256"])
        checkpoint = {"file": pretrained.checkpoint.name, "sha256": file_sha256(pretrained.checkpoint)}
        return cls(checkpoint=checkpoint, manifest=manifest)


def _image_description(pretrained: PretrainedEncoder, modality: str, ct_window: Sequence[float]) -> str:
    pre = pretrained.config.preprocess
    spacing = "x".join(f"{s:g}" for s in pre.spacing)
    if modality == "CT":
        low, high = ct_window  # the bundle's fine-tuning window (the pretraining one unless export chose another)
        intensity = f"CT clipped to [{low:g}, {high:g}] HU and scaled to [0, 1]"
    else:
        low, high = pre.mr_percentiles
        intensity = f"MR clipped to its foreground's {low:g}-{high:g} percentiles and z-scored over the foreground"
    channels = pretrained.config.model.in_channels
    return (
        f"{channels} channel(s), RAS, resampled to {spacing} mm, cropped to the body; {intensity} "
        "(volpre.export.transforms.deterministic_transforms)"
    )


def fill_metadata(
    template: dict[str, Any],
    pretrained: PretrainedEncoder,
    network: str,
    modality: str,
    roi_size: Sequence[int],
    out_channels: int | None,
    provenance: Provenance,
    ct_window: Sequence[float],
) -> dict[str, Any]:
    """The template with versions, ``network_data_format`` and provenance filled in (a new dict).

    Args:
        template: the task's ``metadata.json`` template.
        pretrained: the exported encoder and its checkpoint's record.
        network: the bundle network (a :data:`volpre.export.networks.NETWORKS` name).
        modality: ``"CT"`` or ``"MR"``.
        roi_size: the network's patch size ``(X, Y, Z)`` (multiples of 32).
        out_channels: segmentation classes including background; ``None`` for survival.
        provenance: the checkpoint's and pretraining manifest's names and digests.
        ct_window: the fine-tuning CT window ``(low, high)`` in HU (the bundle's ``ct_window``).

    Long because MONAI's metadata.json is a nested document filled field by field (versions, inputs,
    outputs, provenance); each block sets one part of it.
    """
    meta = copy.deepcopy(template)
    versions = installed_package_versions()
    meta["monai_version"] = versions["monai"]
    meta["pytorch_version"] = versions["torch"]
    meta["numpy_version"] = versions["numpy"]
    meta["required_packages_version"] = versions
    cfg = pretrained.config
    objective = cfg.objective.name
    encoder_text = (
        f"Swin (feature_size {cfg.model.swin.feature_size})" if cfg.model.encoder == "swin"
        else f"ResNet-{cfg.model.resnet.depth}"
    )
    if pretrained.pretrained_by_volpre:
        origin = f"{objective} pretraining, step {pretrained.step}, {pretrained.weights} weights"
        trained = f"was pretrained without labels by volpre ({objective}, {pretrained.step} steps)"
    else:
        objective = None
        origin = f"{pretrained.origin} encoder weights, not pretrained by volpre"
        trained = f"starts from {pretrained.origin} weights ({pretrained.checkpoint.name}; not pretrained by volpre)"
    meta["changelog"] = {meta["version"]: f"exported by volpre {__version__} from {pretrained.checkpoint.name} ({origin})"}
    meta["description"] = (
        f"{network} whose encoder, a {encoder_text}, {trained}. Fine-tune it with configs/train.json on a volpre "
        "manifest; see docs/README.md."
    )
    manifest = provenance.manifest
    meta["data_source"] = (
        f"your volpre manifest (--manifest); the encoder was pretrained on manifest {manifest.get('file', 'unknown')} "
        f"(sha256 {manifest.get('sha256', 'unknown')})"
        if pretrained.pretrained_by_volpre else
        f"your volpre manifest (--manifest); the encoder's weights come from {pretrained.checkpoint.name}, not from "
        "volpre pretraining"
    )
    meta["image_classes"] = _image_description(pretrained, modality, ct_window)
    image = {
        "type": "image",
        "format": "hounsfield" if modality == "CT" else "magnitude",
        "modality": modality,
        "num_channels": cfg.model.in_channels,
        "spatial_shape": list(roi_size),
        "dtype": "float32",
        "value_range": [0, 1] if modality == "CT" else [],
        "is_patch_data": network != "survivalnet",
        "channel_def": {str(c): "image" for c in range(cfg.model.in_channels)},
    }
    if out_channels is not None:
        classes = {"0": "background", **{str(c): f"class {c}" for c in range(1, out_channels)}}
        meta["label_classes"] = f"one channel of class indices 0..{out_channels - 1} (0 background)"
        meta["pred_classes"] = f"{out_channels} channels of logits, one per class (0 background)"
        pred = {
            "type": "image",
            "format": "logits",
            "num_channels": out_channels,
            "spatial_shape": list(roi_size),
            "dtype": "float32",
            "value_range": [],
            "is_patch_data": True,
            "channel_def": classes,
        }
        post = {
            "type": "image",
            "format": "segmentation",
            "num_channels": 1,
            "spatial_shape": ["*", "*", "*"],
            "dtype": "uint8",
            "value_range": [0, out_channels - 1],
            "is_patch_data": False,
            "channel_def": {"0": "class index"},
        }
        meta["network_data_format"] = {"inputs": {"image": image}, "outputs": {"pred": pred},
                                       "post_processed_outputs": {"pred": post}}
    else:
        pred = {
            "type": "tensor",
            "format": "log-hazard",
            "num_channels": 1,
            "spatial_shape": [],
            "dtype": "float32",
            "value_range": [],
            "is_patch_data": False,
            "channel_def": {"0": "Cox log-hazard (higher = earlier event)"},
        }
        meta["network_data_format"] = {"inputs": {"image": image}, "outputs": {"pred": pred}}
    meta["volpre_pretraining"] = {
        "origin": pretrained.origin,
        "checkpoint": provenance.checkpoint,
        "weights": pretrained.weights,
        "objective": objective,
        "step": pretrained.step,
        "manifest": manifest,
        "encoder": cfg.to_dict()["model"],
        "preprocess": cfg.to_dict()["preprocess"],
        "versions": pretrained.versions,
    }
    is_ct = modality == "CT"
    meta["volpre_finetuning"] = {
        "ct_window": [float(v) for v in ct_window] if is_ct else None,
        "pretraining_ct_window": [float(v) for v in cfg.preprocess.ct_window] if is_ct else None,
        "intensity": (f"CT clipped to [{ct_window[0]:g}, {ct_window[1]:g}] HU and scaled to [0, 1]" if is_ct
                      else "MR clipped to foreground percentiles and z-scored over the foreground"),
    }
    return meta

