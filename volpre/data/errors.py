"""The one exception every volume check raises: :class:`VolumeError` (and :class:`CacheError`,
which is never the volume's fault).

A ``VolumeError`` names the file (``path``), a machine-readable category (``kind``, one of
:data:`ERROR_KINDS`) and a human-readable ``reason`` that says what was found and what was
expected. The manifest checker groups problems by ``kind`` and prints ``reason``; ``str(err)``
is ``"<path>: <reason>"``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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
