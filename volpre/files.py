"""Writing files so that a reader never sees half of one, and cleaning up after writers that died.

A writer builds ``NAME`` under a temporary name beside it, :func:`temporary_path`
(``.NAME.tmp<pid>@<host>``), fsyncs it, renames it onto ``NAME`` and fsyncs the folder
(:func:`atomic_write`, :func:`atomic_write_text`, :func:`atomic_torch_save`): after a crash
or a power cut ``NAME`` is the old file or the new one, never a part of one. A writer killed
before the rename leaves the temporary behind; :func:`remove_stale_temporaries` deletes those of
dead writers. :func:`file_sha256` fingerprints what was written; :func:`read_torch_file` is the one
guard around ``torch.load`` (checkpoints, weight files).

The bottom layer of volpre's I/O: it imports nothing of volpre but :mod:`volpre.errors`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Any, Callable

import torch

from volpre.errors import UserInputError

STALE_FOREIGN_TEMP_AGE_S = 3600.0
"""A temporary written on another host (whose process cannot be checked) is stale after this long."""
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)(?:@(?P<host>.+))?$")


def temporary_path(path: str | os.PathLike[str]) -> Path:
    """Where this process builds ``path`` before renaming it there: ``.NAME.tmp<pid>@<host>`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}@{socket.gethostname()}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Delete the temporaries (files or folders) that dead writers left in ``folder``; return them.

    A temporary of this host is stale when its process is gone; one of another host (shared
    filesystems) when it has not changed for :data:`STALE_FOREIGN_TEMP_AGE_S`. Names without a host
    (``.NAME.tmp<pid>``, older volpre) count as this host's. ``name`` restricts the search to the
    temporaries of that one target. A temporary of a live writer is never touched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, here = [], socket.gethostname()
    for candidate in folder.iterdir():
        match = _TEMPORARY.match(candidate.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        pid, host = int(match["pid"]), match["host"] or here
        try:
            if host == here:
                stale = pid != os.getpid() and not _process_alive(pid)
            else:
                stale = time.time() - candidate.lstat().st_mtime > STALE_FOREIGN_TEMP_AGE_S
            if not stale:
                continue
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate)
            else:
                candidate.unlink()
        except FileNotFoundError:  # another process removed it first
            continue
        removed.append(candidate)
    return removed


def describe_write_error(exc: OSError) -> str:
    """Why a write failed, in words that say what to do (full disk, quota, read-only)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    advice = {
        errno.ENOSPC: "the disk is full; free space there or write elsewhere",
        errno.EDQUOT: "the disk quota is exhausted; free space there or write elsewhere",
        errno.EROFS: "the filesystem is read-only; write elsewhere",
    }.get(exc.errno)
    return f"{reason} ({advice})" if advice else reason


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make a rename in ``folder`` durable; a no-op where the filesystem cannot fsync a folder."""
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


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write`` on a binary file that becomes ``path`` only once it is complete and on disk.

    The temporary (:func:`temporary_path`) is flushed and fsynced, renamed onto ``path``, and the
    folder fsynced; on any error it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OutputExistsError(UserInputError, FileExistsError):
    """An output folder that must be new or empty is a file or holds files."""


def check_new_output(out: str | os.PathLike[str], what: str, hint: str = "") -> None:
    """Refuse an output folder that is a file or a non-empty directory (a new or empty one is fine).

    Raises:
        OutputExistsError: ``"<what> <out> is a file|a non-empty directory; expected a new or empty
            directory<hint>"``.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        found = "a file" if not out.is_dir() else "a non-empty directory"
        raise OutputExistsError(f"{what} {out} is {found}; expected a new or empty directory{hint}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def read_torch_file(path: str | os.PathLike, what: str, error: type[Exception], damaged: str = "corrupt") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, the one guard around it in volpre.

    Args:
        path: the file.
        what: what it should hold, for messages (``"checkpoint"``, ``"pretrained encoder weights"``).
        error: the exception type raised (callers use their own layer's error).
        damaged: the end of the message for an unreadable file: "it may be truncated or <damaged>".

    Raises:
        ``error``: the file is missing, empty, or ``torch.load`` cannot read it; the message
        names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        try:
            empty = path.stat().st_size == 0
        except OSError:
            empty = False
        detail = "the file is empty" if empty else f"{type(exc).__name__}: {_first_line(exc) or 'no message'}"
        raise error(f"{what} {path}: cannot be read ({detail}); it may be truncated or {damaged}") from exc
