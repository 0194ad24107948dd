"""The pretrained encoder inside a volpre pretraining checkpoint, checked before it is exported.

A checkpoint (:mod:`volpre.engine.checkpoint`) holds the whole pretrainer (``model``: keys
``encoder.*``, ``decoder.*`` and the objective's own parameters), optionally its EMA average
(``ema``: ``torch.optim.swa_utils.AveragedModel`` keys ``module.encoder.*``), the run ``config``,
the ``versions`` it was trained with, its ``step`` and its data ``manifest`` (path, SHA-256).
:func:`read_pretrained_encoder` takes the encoder's tensors out and refuses, with a message that
names the file:

- a file that cannot be read (truncated, corrupt, not a checkpoint);
- a config that is not a valid volpre run config;
- Swin weights trained with MONAI < 1.5 (MONAI 1.5 changed ``PatchMerging``, Swin's default
  downsampling, so older Swin weights do not mean the same thing in today's ``SwinUNETR``),
  or Swin weights whose checkpoint does not record the MONAI version;
- weights that do not fit the encoder the checkpoint's own config describes (every missing,
  unexpected and misshapen key listed);
- weights holding NaN or Inf (a diverged run), naming the tensors.

:func:`read_encoder_weights` does the same for encoder weights from outside volpre pretraining
(``volpre export --encoder-weights``: MedicalNet files, volpre bundles), read with the key maps of
:mod:`volpre.models.init_weights` into the encoder a run config describes, strictly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from packaging.version import InvalidVersion, Version

from volpre.config import RunConfig
from volpre.engine.checkpoint import CheckpointError, checkpoint_run_config, load_checkpoint
from volpre.export.errors import ExportError
from volpre.models import build_encoder
from volpre.models.weights import check_state_dict

SWIN_MIN_MONAI = (1, 5)
"""Oldest MONAI release whose Swin ``PatchMerging`` matches today's (changed in MONAI 1.5)."""

WEIGHT_SOURCES: dict[str, str] = {"model": "encoder.", "ema": "module.encoder."}
"""Which weights of a checkpoint to export -> the prefix of the encoder's keys in that state dict."""


@dataclass(frozen=True)
class PretrainedEncoder:
    """An encoder's tensors and what is known about how they were trained."""

    checkpoint: Path
    """The file they come from (a checkpoint, or the ``--encoder-weights`` file)."""
    config: RunConfig
    """The pretraining run config (``config.model`` describes the encoder; for ``--encoder-weights``,
    the config given with them)."""
    state: dict[str, torch.Tensor]
    """Encoder keys (as in ``volpre.models.build_encoder(config.model).state_dict()``) -> CPU tensors."""
    weights: Literal["model", "ema"]
    """Whether ``state`` holds the trained weights or their exponential moving average."""
    step: int
    """Optimiser steps of pretraining."""
    versions: dict[str, str]
    """Package versions the checkpoint was trained with (``volpre``, ``monai``, ``torch``, ...)."""
    manifest: dict[str, Any] | None
    """``{"path": ..., "sha256": ...}`` of the pretraining manifest, if recorded."""
    origin: str = "volpre"
    """``"volpre"`` for weights a volpre pretraining run trained; else the layout of the weights file
    exported with ``--encoder-weights`` (``"medicalnet"``, ``"bundle"``): no objective, steps or
    pretraining data are known for them."""

    @property
    def pretrained_by_volpre(self) -> bool:
        return self.origin == "volpre"

    @property
    def encoder(self) -> str:
        """Encoder family: ``"swin"`` or ``"resnet"``."""
        return self.config.model.encoder


def check_swin_monai_version(versions: dict[str, Any], checkpoint: Path) -> None:
    """Refuse Swin weights trained with MONAI < 1.5 (or with no MONAI version recorded).

    Raises:
        CheckpointError: naming the file, the version found, and why it matters.
    """
    recorded = versions.get("monai") if isinstance(versions, dict) else None
    why = (
        "MONAI 1.5 changed PatchMerging (the Swin encoder's downsampling), so Swin weights from "
        "MONAI < 1.5 do not line up with today's SwinUNETR; pretrain again with MONAI >= 1.5"
    )
    if not isinstance(recorded, str):
        raise CheckpointError(
            f"checkpoint {checkpoint}: Swin weights without a recorded MONAI version (versions.monai); "
            f"refusing to export them: {why}"
        )
    try:
        release = Version(recorded).release
    except InvalidVersion as exc:
        raise CheckpointError(
            f"checkpoint {checkpoint}: recorded MONAI version {recorded!r} is not a version number; {why}"
        ) from exc
    if release[:2] < SWIN_MIN_MONAI:
        raise CheckpointError(
            f"checkpoint {checkpoint}: Swin weights were trained with MONAI {recorded}, expected MONAI >= "
            f"{'.'.join(map(str, SWIN_MIN_MONAI))}: {why}"
        )


def check_finite(state: dict[str, torch.Tensor], source: str, shown: int = 20) -> None:
    """Refuse weights holding NaN or Inf (a run that diverged), naming every such tensor (up to ``shown``).

    Raises:
        CheckpointError: ``source`` and the non-finite tensors.
    """
    bad = [key for key, value in state.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        more = f" and {len(bad) - shown} more" if len(bad) > shown else ""
        raise CheckpointError(
            f"{source}: {len(bad)} of {len(state)} encoder tensors hold NaN or Inf values: {', '.join(bad[:shown])}"
            f"{more}; the run diverged before this checkpoint was written: export an earlier one"
        )


def read_pretrained_encoder(
    checkpoint: str | os.PathLike[str], weights: Literal["model", "ema"] = "model"
) -> PretrainedEncoder:
    """Read and check the encoder of a volpre pretraining checkpoint.

    Args:
        checkpoint: a ``.pt`` written by ``volpre pretrain`` (e.g. ``checkpoints/last.pt``).
        weights: ``"model"`` for the trained weights, ``"ema"`` for their moving average
            (only when pretraining ran with ``train.ema_decay > 0``).

    Raises:
        CheckpointError: the file cannot be read or is not a volpre checkpoint, its config is
            invalid, ``weights="ema"`` but it holds no EMA, Swin weights from MONAI < 1.5, or
            encoder tensors holding NaN/Inf.
        WeightsError: its encoder tensors do not fit the encoder its config describes.
        ExportError: ``weights`` is neither ``"model"`` nor ``"ema"``.
    """
    if weights not in WEIGHT_SOURCES:
        raise ExportError(f"weights: got {weights!r}, expected one of {', '.join(map(repr, WEIGHT_SOURCES))}")
    path = Path(checkpoint)
    saved = load_checkpoint(path)
    config = checkpoint_run_config(saved, path)
    if config.model.encoder == "swin":
        check_swin_monai_version(saved["versions"], path)

    if weights == "ema" and saved.get("ema") is None:
        raise CheckpointError(
            f"checkpoint {path}: weights='ema' asked for, but the run kept no moving average "
            "(train.ema_decay was 0); export weights='model'"
        )
    source_state = saved["model"] if weights == "model" else saved["ema"]
    prefix = WEIGHT_SOURCES[weights]
    state = {key[len(prefix):]: value for key, value in source_state.items() if key.startswith(prefix)}
    model = config.model
    shape = (
        f"resnet{model.resnet.depth}"
        if model.encoder == "resnet"
        else f"swin feature_size={model.swin.feature_size}, depths={list(model.swin.depths)}"
    )
    check_state_dict(
        build_encoder(model).state_dict(),
        state,
        source=f"checkpoint {path} ({weights} weights, keys {prefix}*)",
        target=f"the {model.encoder} encoder its config describes ({shape}, in_channels={model.in_channels})",
    )
    check_finite(state, f"checkpoint {path}: {weights} weights (keys {prefix}*)")
    return PretrainedEncoder(
        checkpoint=path,
        config=config,
        state=state,
        weights=weights,
        step=int(saved["step"]),
        versions={str(k): str(v) for k, v in saved["versions"].items()},
        manifest=saved.get("manifest"),
    )


ENCODER_WEIGHT_FORMATS = ("auto", "medicalnet", "bundle")
"""Layouts ``volpre export --encoder-weights`` reads (a volpre checkpoint is exported as itself)."""


def read_encoder_weights(path: str | os.PathLike[str], config: RunConfig, fmt: str = "auto") -> PretrainedEncoder:
    """Encoder weights from outside volpre pretraining, loaded strictly into ``config.model``'s encoder.

    ``fmt``: one of :data:`ENCODER_WEIGHT_FORMATS` (``auto``: recognised from the file); the key
    maps are :func:`volpre.models.init_weights.read_init_state`'s. The result has ``step`` 0, no
    manifest, and ``origin`` the layout read.

    Raises:
        CheckpointError: the file cannot be read, its layout is unknown or refused (MONAI's
            ``model_swinvit.pt``), it is a volpre checkpoint (export it directly), or it holds NaN/Inf.
        WeightsError: its tensors do not fit the encoder (every missing, unexpected and misshapen key).
    """
    from volpre.models.init_weights import InitWeightsError, read_init_state

    if fmt not in ENCODER_WEIGHT_FORMATS:
        raise CheckpointError(f"--init-format: got {fmt!r}; --encoder-weights reads {', '.join(ENCODER_WEIGHT_FORMATS)}")
    try:
        state, found, file = read_init_state(path, fmt, option="--encoder-weights")
    except InitWeightsError as exc:
        raise CheckpointError(str(exc)) from exc
    if found == "volpre":
        raise CheckpointError(f"--encoder-weights {file}: a volpre pretraining checkpoint; export it as itself "
                              f"(volpre export {file} --task ...), which keeps its config and record")
    model = config.model
    check_state_dict(build_encoder(model).state_dict(), state, source=f"--encoder-weights {file} ({found} layout)",
                     target=f"the {model.encoder} encoder of the given config (model section, "
                            f"in_channels={model.in_channels})")
    check_finite(state, f"--encoder-weights {file}")
    return PretrainedEncoder(checkpoint=file, config=config, state={k: v.detach().cpu() for k, v in state.items()},
                             weights="model", step=0, versions={}, manifest=None, origin=found)
