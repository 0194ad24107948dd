"""Checkpoints that are never lost, never trusted when damaged, and always load with
``torch.load(..., weights_only=True)``.

Layout under ``<output>/checkpoints/``: ``step_00000500.pt`` (the last ``keep_last`` of them),
``last.pt`` (the newest) and ``best.pt`` (lowest mean training loss over the steps since the
previous checkpoint; or, with ``train.best_by: probe``, the highest probe metric). Every file
appears atomically: written to a temporary name in the same folder (``.NAME.tmp<pid>@<host>``),
flushed to disk, then renamed over the target; a crash mid-write leaves the previous file intact,
and the next run removes the temporaries of dead writers. ``last.pt``/``best.pt`` are hard links
to the step file when the filesystem allows (no second write), copies otherwise: damage to one is
damage to all of its names.

So every checkpoint carries a ``checksum`` (SHA-256 over every value it holds: each tensor's
dtype, shape and bytes, every plain value, in a fixed order; see :func:`state_checksum`) and
:func:`load_checkpoint`, the one reader of checkpoints in volpre, verifies it: a bit flip
anywhere in the tensors or the pickled values is an error, never different weights. Its errors
name the file and the newest readable ``step_*.pt`` beside it; ``volpre pretrain --resume``
falls back to that one by itself when ``last.pt`` cannot be used. :func:`volpre.files.read_torch_file`, the
one guard around ``torch.load``, reads them.

A checkpoint holds only tensors and plain Python values (dicts, lists, str, int, float, bool),
so the safe ``weights_only`` unpickler reads it:
``model`` (encoder + decoder + objective heads, no DDP/compile prefixes), ``optimizer``,
``scheduler``, ``scaler``, ``ema`` (or None), ``rng`` (per-rank RNG states), ``step``,
``items_seen`` (per-rank data position), ``world_size``, ``sync_batchnorm`` (whether BatchNorm layers
reduced across ranks), ``best_loss``, ``best_probe``, ``config``,
``versions``, ``encoder`` (name), ``manifest`` (path and SHA-256 of the manifest the weights are
being trained on), ``data`` (the selected splits, the entries and the history of data changes:
:mod:`volpre.engine.provenance`), ``nnunet_plans`` (the nnU-Net plans dict of an ``nnunet``
encoder, else None), ``init`` (``--init`` weights: path, format, SHA-256; else None) and ``checksum``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volpre.config import ConfigError, RunConfig, config_from_dict
from volpre.errors import UserInputError
from volpre.files import atomic_torch_save, read_torch_file, describe_write_error, fsync_folder, remove_stale_temporaries, temporary_path

log = logging.getLogger(__name__)

STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")


CHECKSUM_KEY = "checksum"
"""The key holding a checkpoint's :func:`state_checksum`."""
REQUIRED_KEYS = ("model", "config", "versions", "step")


class CheckpointError(UserInputError, RuntimeError):
    """A checkpoint is missing, unreadable, damaged, or does not fit the run that loads it."""


# ----------------------------------------------------------------------------- reading


def state_checksum(state: dict[str, Any]) -> str:
    """SHA-256 (hex) of everything in ``state`` but its ``checksum`` key.

    Fed in a fixed order: dict items sorted by key, list and tuple items in order; a tensor as
    its dtype, shape and bytes (on the CPU, contiguous); any other value as its type and
    ``repr`` (exact for floats). A value changed anywhere changes the digest.
    """
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return digest.hexdigest()


def _feed(digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}:".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def with_checksum(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its ``checksum`` (what :class:`CheckpointManager` saves; for tools that
    write checkpoints themselves)."""
    return {**state, CHECKSUM_KEY: state_checksum(state)}


def _read_verified(path: Path) -> dict[str, Any]:
    state = read_torch_file(path, "checkpoint", CheckpointError, damaged="not a volpre checkpoint")
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path}: not a volpre pretraining checkpoint (missing {', '.join(missing)})")
    recorded = state.get(CHECKSUM_KEY)
    if not isinstance(recorded, str):
        raise CheckpointError(
            f"checkpoint {path}: holds no checksum, so it cannot be verified (volpre pretrain writes one into every "
            "checkpoint; this file was written some other way)"
        )
    if state_checksum(state) != recorded:
        raise CheckpointError(
            f"checkpoint {path}: checksum mismatch: its contents are not what volpre wrote (damaged on disk, or "
            "edited)"
        )
    return state


@dataclass(frozen=True)
class FoundCheckpoint:
    """A checkpoint file that was read and verified."""

    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def step_files(folder: str | os.PathLike) -> list[Path]:
    """The ``step_*.pt`` files in ``folder``, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if STEP_FILE.match(p.name))


def _same_file(a: Path, b: Path | None) -> bool:
    try:
        return b is not None and os.path.samefile(a, b)
    except OSError:
        return False


def newest_readable(folder: str | os.PathLike, exclude: str | os.PathLike | None = None) -> FoundCheckpoint | None:
    """The newest ``step_*.pt`` in ``folder`` that reads and verifies, skipping ``exclude`` and
    every other name of its file (hard links share its damage); None if there is none."""
    exclude = Path(exclude) if exclude is not None else None
    for path in reversed(step_files(folder)):
        if _same_file(path, exclude):
            continue
        try:
            return FoundCheckpoint(path, _read_verified(path))
        except CheckpointError:
            continue
    return None


def fallback_hint(path: Path) -> str:
    """What to use instead of the unusable checkpoint ``path``: the newest readable step beside it."""
    candidates = [p for p in step_files(path.parent) if not _same_file(p, path)]
    if not candidates:
        return ""
    found = newest_readable(path.parent, exclude=path)
    if found is None:
        return f"; none of the {len(candidates)} other step_*.pt beside it can be read either"
    return f"; the newest readable checkpoint beside it is {found.path} (step {found.step})"


def checkpoint_run_config(saved: dict[str, Any], path: str | os.PathLike) -> RunConfig:
    """The run config a loaded checkpoint (:func:`load_checkpoint`) was written with.

    Raises:
        CheckpointError: the saved config is not valid (any more).
    """
    try:
        return config_from_dict(saved["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path}: its run config is not valid: {exc}") from exc


def load_checkpoint(path: str | os.PathLike, suggest_fallback: bool = True) -> dict[str, Any]:
    """Read and verify a checkpoint (safe unpickler, checksum).

    Raises:
        CheckpointError: naming the file and why it cannot be used, and (``suggest_fallback``)
            the newest readable ``step_*.pt`` beside it.
    """
    path = Path(path)
    try:
        return _read_verified(path)
    except CheckpointError as exc:
        if not suggest_fallback:
            raise
        raise CheckpointError(f"{exc}{fallback_hint(path)}") from exc.__cause__


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """This process's RNG states: torch (CPU and current CUDA device), numpy, python, objective."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _python_state_to_plain(random.getstate()),
        "objective": generator.get_state(),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(_python_state_from_plain(state["python"]))
    generator.set_state(state["objective"])


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_plain(plain: list) -> tuple:
    version, internal, gauss = plain
    return (version, tuple(internal), gauss)


def _atomic_alias(source: Path, alias: Path) -> None:
    """Make ``alias`` a hard link to ``source`` (a copy if links fail), replacing it atomically."""
    tmp = temporary_path(alias)
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, alias)
    fsync_folder(alias.parent)


class CheckpointManager:
    """Writes step checkpoints (with their checksum), keeps the last ``keep_last``, and maintains
    last.pt and best.pt."""

    def __init__(self, folder: Path, keep_last: int):
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.last = self.folder / "last.pt"
        self.best = self.folder / "best.pt"

    def step_files(self) -> list[Path]:
        return step_files(self.folder)

    def holds_a_run(self) -> bool:
        """Whether any checkpoint of a run is here (last.pt, or a step file)."""
        return self.last.exists() or bool(self.step_files())

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the half-written checkpoints of writers that died (``.step_N.pt.tmp<pid>@<host>``)."""
        removed = remove_stale_temporaries(self.folder)
        for path in removed:
            log.warning("removed %s, a checkpoint left half-written by a process that died", path)
        return removed

    def save(self, state: dict[str, Any], step: int, is_best: bool) -> Path:
        """Write ``state`` as ``step_<step>.pt`` with its checksum; point last.pt (and best.pt) at it.

        Raises:
            CheckpointError: the folder cannot be written (a full disk, a quota, a read-only
                filesystem); the previous checkpoints stay as they were.
        """
        path = self.folder / f"step_{step:08d}.pt"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(with_checksum(state), path)
            _atomic_alias(path, self.last)
            if is_best:
                _atomic_alias(path, self.best)
            for old in self.step_files()[: -self.keep_last]:
                old.unlink()
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoint {path}: {describe_write_error(exc)}") from exc
        return path
