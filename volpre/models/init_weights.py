"""Start pretraining from weights users already have (``volpre pretrain --init PATH --init-format F``).

Each format has an explicit key map onto volpre's encoder keys (which are MONAI's own layouts, see
:mod:`volpre.models`); the mapped state dict must then fit the run's encoder exactly (every
missing, unexpected or misshapen key is listed, :func:`volpre.models.weights.check_state_dict`).

- ``medicalnet``: Tencent MedicalNet ``resnet_N[_23dataset].pth``, ``{"state_dict": {"module.<key>": ...}}``.
  MONAI's own MedicalNet loader (``monai.networks.nets.resnet._load_state_dict``) drops ``module.`` and
  loads the rest strictly into ``ResNetFeatures``; volpre's ResNet encoder *is* a ``ResNetFeatures``, so
  the map is the same: ``module.<key>`` -> ``<key>``.
- ``monai-swin-ssl``: MONAI research-contributions' Swin UNETR self-supervised ``model_swinvit.pt``
  (``{"state_dict": {"module.<SwinViT key>": ...}}``, MLP layers named ``fc1``/``fc2``). Recognised and
  refused: those weights were trained with MONAI < 1.5, whose 3D ``PatchMerging`` concatenated the
  2x2x2 neighbours with two duplicated and two missing (MONAI issue #8284, fixed in 1.5); MONAI >= 1.5's
  ``PatchMerging`` normalises and projects all eight, so no mapping of the same tensors computes what
  the weights were trained to compute (the layer norm's statistics differ). See :data:`SWIN_SSL_REFUSAL`.
- ``volpre``: a ``volpre pretrain`` checkpoint: its ``encoder.*`` tensors (config checked through the keys).
- ``bundle``: a volpre bundle folder (or its ``models/pretrained_encoder.pt``): the network's encoder keys
  (``swinViT.*`` or ``encoder.*``) without that prefix.
- ``auto``: the format recognised from the file's layout (named in the log and the error messages).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from volpre.errors import UserInputError

INIT_FORMATS = ("auto", "monai-swin-ssl", "medicalnet", "volpre", "bundle")
"""``--init-format`` choices."""

BUNDLE_ENCODER_FILE = Path("models") / "pretrained_encoder.pt"
BUNDLE_PREFIXES = ("swinViT.", "encoder.")
"""Prefixes of the encoder's keys in volpre bundles (SwinUNETR; FlexibleUNet and SurvivalNet)."""

SWIN_SSL_REFUSAL = (
    "these are MONAI research-contributions Swin UNETR self-supervised weights (model_swinvit.pt layout), trained "
    "with MONAI < 1.5, whose 3D PatchMerging concatenated the 2x2x2 neighbours with two of them duplicated and two "
    "missing (MONAI issue #8284, fixed in MONAI 1.5); MONAI {monai}'s PatchMerging normalises and projects all "
    "eight, so no mapping of these tensors computes what they were trained to compute. Fine-tune them with the "
    "architecture they were trained with (MONAI 1.4: SwinUNETR(..., use_v2=False).load_from(weights)), or "
    "pretrain a Swin encoder with volpre (MONAI >= 1.5) and start later runs from it (--init-format volpre)"
)


class InitWeightsError(UserInputError, ValueError):
    """An ``--init`` file cannot be used: unreadable, of an unknown or refused layout."""


def _load(path: Path, option: str = "--init") -> Any:
    if not path.is_file():
        raise InitWeightsError(f"{option} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        first = (str(exc).splitlines() or [""])[0][:200]
        raise InitWeightsError(f"{option} {path}: cannot be read ({type(exc).__name__}: {first})") from exc


def _is_tensor_map(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def detect_format(data: Any) -> str | None:
    """The layout of a loaded file (``None`` if none is recognised)."""
    if isinstance(data, dict) and "model" in data and "config" in data and "versions" in data:
        return "volpre"
    state = data.get("state_dict") if isinstance(data, dict) else None
    if _is_tensor_map(state) and all(k.startswith("module.") for k in state):
        if "module.patch_embed.proj.weight" in state:
            return "monai-swin-ssl"
        if "module.conv1.weight" in state:
            return "medicalnet"
    if _is_tensor_map(data) and any(k.startswith(BUNDLE_PREFIXES) for k in data):
        return "bundle"
    return None


def read_init_state(path: str | os.PathLike[str], fmt: str = "auto",
                    option: str = "--init") -> tuple[dict[str, torch.Tensor], str, Path]:
    """The encoder state dict in ``path`` under volpre's encoder keys, the format it was read as, and the file
    read (a bundle folder's ``models/pretrained_encoder.pt``). ``option`` names the file in messages
    (``--init``, or ``--encoder-weights`` of ``volpre export``).

    Raises:
        InitWeightsError: the file cannot be read, its layout is not ``fmt`` (or none is recognised with
            ``auto``), or it is refused (``monai-swin-ssl``, see :data:`SWIN_SSL_REFUSAL`).
    """
    if fmt not in INIT_FORMATS:
        raise InitWeightsError(f"--init-format: got {fmt!r}, expected one of {', '.join(INIT_FORMATS)}")
    path = Path(path)
    if path.is_dir():  # a bundle folder
        path = path / BUNDLE_ENCODER_FILE
    data = _load(path, option)
    found = detect_format(data)
    if fmt == "auto":
        if found is None:
            raise InitWeightsError(
                f"{option} {path}: not a layout volpre knows (a volpre checkpoint, a volpre bundle's encoder file, a "
                "MedicalNet {'state_dict': {'module.conv1.weight', ...}} file, or MONAI's model_swinvit.pt)")
        fmt = found
    elif found != fmt:
        raise InitWeightsError(f"{option} {path}: --init-format {fmt}, but the file's layout is "
                               f"{found or 'none volpre knows'}")
    if fmt == "monai-swin-ssl":
        import monai

        raise InitWeightsError(f"{option} {path}: " + SWIN_SSL_REFUSAL.format(monai=monai.__version__))
    if fmt == "medicalnet":
        return {key[len("module."):]: value for key, value in data["state_dict"].items()}, fmt, path
    if fmt == "volpre":
        state = {key[len("encoder."):]: value for key, value in data["model"].items() if key.startswith("encoder.")}
        return state, fmt, path
    prefix = next(p for p in BUNDLE_PREFIXES if any(k.startswith(p) for k in data))
    return {key[len(prefix):]: value for key, value in data.items() if key.startswith(prefix)}, fmt, path
