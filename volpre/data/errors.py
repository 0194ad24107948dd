"""The one exception every volume check raises: :class:`VolumeError` (and :class:`CacheError`,
which is never the volume's fault).

A ``VolumeError`` names the file (``path``), a machine-readable category (``kind``, one of
:data:`ERROR_KINDS`) and a human-readable ``reason`` that says what was found and what was
expected. The manifest checker groups problems by ``kind`` and prints ``reason``; ``str(err)``
is ``"<path>: <reason>"``.

:func:`as_bad_data` tells bad data (skip the entry) from errors of the machine or of volpre
(stop the run); :class:`StopRun` carries an error that stops the run out of a DataLoader worker.
Both live here, below the cache and the crop stream that use them.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Iterator

from volpre.errors import UserInputError
from volpre.text import printable

ERROR_KINDS: tuple[str, ...] = (
    "missing",  # the path does not exist
    "unreadable",  # unknown format, garbage, or a library could not parse it
    "truncated",  # the file holds fewer pixel bytes than its header promises
    "non-finite",  # NaN or infinite voxels
    "dimensionality",  # 2D image, single DICOM slice, 4D without a frame, 5D
    "bad-frame",  # ``frame`` out of range, or given for an image that has no frames
    "non-scalar",  # RGB, complex or vector voxels
    "not-an-image",  # DICOM objects that hold no image (SEG, RTSTRUCT, SR, ...) or localizers
    "dicom-series",  # a DICOM series whose slices do not form a regular volume
    "multiple-series",  # several DICOM series where one was expected
    "unknown-series",  # the requested SeriesInstanceUID is not there
    "modality",  # no preprocessing preset for the volume's modality
    "label",  # a label volume that does not hold class indices
    "grid-mismatch",  # two volumes that must share a voxel grid do not
)
"""Every allowed ``VolumeError.kind``; extend this tuple to add a category."""


class VolumeError(UserInputError, ValueError):
    """A volume that cannot be used, with the file, a category and a reason.

    Args:
        path: the file or directory concerned (converted to ``str``).
        kind: one of :data:`ERROR_KINDS`.
        reason: what was found and what was expected, e.g. ``"4D image with 7 frames;
            expected a 3D volume (pass frame=K with 0 <= K < 7 to choose one)"``.
    """

    def __init__(self, path: str | os.PathLike[str], kind: str, reason: str):
        if kind not in ERROR_KINDS:
            raise ValueError(f"VolumeError kind {kind!r} is not one of {', '.join(ERROR_KINDS)}")
        self.path = str(path)
        self.kind = kind
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # Rebuild from the three fields (the default would call __init__ with the message only),
        # so the error survives pickling between DataLoader workers and processes.
        return (type(self), (self.path, self.kind, self.reason))


@dataclass(frozen=True)
class EntryProblem:
    """One problem of one manifest entry, as ``volpre check`` and ``volpre cache`` report it."""

    entry_id: str
    path: str
    kind: str
    """A :data:`ERROR_KINDS` value, or a reporter's own category (e.g. ``manifest-mismatch``)."""
    reason: str

    @classmethod
    def from_error(cls, entry_id: str, error: VolumeError) -> "EntryProblem":
        return cls(entry_id, error.path, error.kind, error.reason)

    def line(self) -> str:
        """``entry id: file: kind: reason`` (one line per problem; control characters escaped)."""
        return ": ".join(printable(part) for part in (self.entry_id, self.path, self.kind, self.reason))


class CacheError(UserInputError, OSError):
    """The preprocessed cache cannot be created or written (a full disk, a quota, a read-only
    filesystem, no permission). Never a property of a source volume: it stops ``volpre cache``
    and ``volpre pretrain`` instead of marking entries bad."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and its causes (MONAI wraps transform errors in RuntimeError)."""
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOMEM, errno.EMFILE, errno.ENFILE})
"""OSErrors of the machine, not of a file: full disk, quota, read-only filesystem, no memory or file handles."""


def as_bad_data(error: BaseException, where: str) -> VolumeError | None:
    """The reason ``error`` makes an entry bad data, as a VolumeError; None when the data are not to blame.

    Bad data: a :class:`VolumeError` anywhere in the exception chain (volpre's checks; the readers
    turn their decoders' own errors into one), or an ``OSError`` raised reading the source (no
    permission, an I/O error, a file that vanished), reported as ``unreadable`` at ``where`` (the
    entry's file) unless it names its own file. Not bad data, whatever else the chain holds: a
    :class:`CacheError` (writing the cache failed), a ``MemoryError``, an ``OSError`` of the
    machine (:data:`ENVIRONMENT_ERRNOS`); nor anything else (a ``TypeError`` in volpre is a bug):
    those must stop the run.
    """
    chain = list(_chain(error))
    for e in chain:
        if isinstance(e, (CacheError, MemoryError)) or (isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS):
            return None
    volume_error = next((e for e in chain if isinstance(e, VolumeError)), None)
    if volume_error is not None:
        return volume_error
    os_error = next((e for e in chain if isinstance(e, OSError)), None)
    if os_error is not None:
        return VolumeError(os_error.filename or where, "unreadable",
                           f"cannot be read: {os_error.strerror or os_error}")
    return None


@dataclass(frozen=True)
class StopRun:
    """An error that stops the run, raised in a DataLoader worker, carried out of it as a value.

    torch re-raises a worker's exception as ``type(error)(its traceback as text)``, which turns a
    one-line error meant for the user (a full cache disk) into a traceback;
    :func:`volpre.data.dataset.crop_loader` raises ``error`` itself in the main process instead.
    """

    error: BaseException
