"""Writing files so that a reader never sees half of one, and cleaning up after writers that died.

A writer builds ``NAME`` under a temporary name beside it, :func:`temporary_path`
(``.NAME.tmp<pid>@<host>``), then renames it onto ``NAME``. A writer killed before the rename
leaves the temporary behind; :func:`remove_stale_temporaries` deletes those of dead writers.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import time
from pathlib import Path

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


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it onto ``path``.

    A crash leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
