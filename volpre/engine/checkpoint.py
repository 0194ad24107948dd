"""Checkpoints that are never lost and always load with ``torch.load(..., weights_only=True)``.

Layout under ``<output>/checkpoints/``: ``step_00000500.pt`` (the last ``keep_last`` of them),
``last.pt`` (the newest) and ``best.pt`` (lowest mean training loss over the steps since the
previous checkpoint; or, with ``train.best_by: probe``, highest probe metric). Every file appears atomically: written to a temporary name in the same
folder, flushed to disk, then renamed over the target; a crash mid-write leaves the previous
file intact. ``last.pt``/``best.pt`` are hard links to the step file when the filesystem allows
(no second write), copies otherwise.

A checkpoint holds only tensors and plain Python values (dicts, lists, str, int, float, bool),
so the safe ``weights_only`` unpickler reads it:
``model`` (encoder + decoder + objective heads, no DDP/compile prefixes), ``optimizer``,
``scheduler``, ``scaler``, ``ema`` (or None), ``rng`` (per-rank RNG states), ``step``,
``samples_seen`` (per-rank data position), ``world_size``, ``best_loss``, ``best_probe``, ``config``,
``versions``, ``encoder`` (name), ``manifest`` (path and SHA-256).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the run that loads it."""


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


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (temp file in the same folder + fsync + rename)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_alias(source: Path, alias: Path) -> None:
    """Make ``alias`` a hard link to ``source`` (a copy if links fail), replacing it atomically."""
    tmp = alias.with_name(f".{alias.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, alias)
    _fsync_dir(alias.parent)


class CheckpointManager:
    """Writes step checkpoints, keeps the last ``keep_last``, and maintains last.pt and best.pt."""

    def __init__(self, folder: Path, keep_last: int):
        self.folder = Path(folder)
        self.keep_last = keep_last

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"

    def step_files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if STEP_FILE.match(p.name))

    def save(self, state: dict[str, Any], step: int, is_best: bool) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step_{step:08d}.pt"
        atomic_save(state, path)
        _atomic_alias(path, self.last)
        if is_best:
            _atomic_alias(path, self.best)
        for old in self.step_files()[: -self.keep_last]:
            old.unlink()
        return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint with the safe unpickler; raise :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(
            f"checkpoint {path}: cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "it may be truncated or not a volpre checkpoint"
        ) from exc
    missing = [k for k in ("model", "config", "versions", "step") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path}: not a volpre pretraining checkpoint (missing {', '.join(missing)})")
    return state
