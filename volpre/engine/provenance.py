"""Which data a pretraining run trains on, as its checkpoints record it, and what a resume changes.

``--resume`` is exact only on the data the run was started on, so every checkpoint records them
under ``data`` (plain values, readable with ``weights_only=True``):

- ``splits``: the manifest splits selected with ``--splits`` (sorted), or ``None`` for every entry;
- ``entries``: ``[[id, fingerprint], ...]`` in dataset order; the fingerprint (16 hex digits of a
  SHA-256) covers what pretraining reads of an entry: its image paths (absolute), ``series_uid``,
  ``modality`` and ``subject``;
- ``history``: one record per stretch of steps trained on one selection, oldest first:
  ``{"from_step", "manifest": {"path", "sha256"}, "splits", "entries", "new_data", "added",
  "removed", "changed"}``. ``new_data`` is true where ``--resume --new-data`` changed the data
  (from then on the run is not what an uninterrupted run would have been). A record is appended,
  never rewritten, so the provenance of the weights is never lost.

:func:`compare` says what differs between a checkpoint's record and the data a resume asks for.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volpre.data.manifest import ManifestEntry

SHOWN_IDS = 5
"""How many entry ids a message names per kind of change."""


def entry_fingerprint(entry: ManifestEntry) -> str:
    """16 hex digits of SHA-256 over what pretraining reads of ``entry`` (images, series, modality, subject)."""
    spec = {"image": [str(p) for p in entry.image], "series_uid": entry.series_uid, "modality": entry.modality,
            "subject": entry.subject}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunData:
    """The data of one invocation: the manifest file, the selected splits and entries."""

    manifest_path: Path
    manifest_sha256: str
    splits: tuple[str, ...] | None
    entries: tuple[tuple[str, str], ...]
    """``(id, fingerprint)`` per selected entry, in dataset order."""

    @classmethod
    def of(cls, manifest_path: Path, manifest_sha256: str, entries: Sequence[ManifestEntry],
           splits: Sequence[str] | None) -> RunData:
        return cls(Path(manifest_path), manifest_sha256, None if splits is None else tuple(sorted(set(splits))),
                   tuple((e.id, entry_fingerprint(e)) for e in entries))

    @property
    def manifest(self) -> dict[str, str]:
        """``{"path", "sha256"}`` of the manifest file (the checkpoint's ``manifest``)."""
        return {"path": str(self.manifest_path.resolve()), "sha256": self.manifest_sha256}

    def history_record(self, from_step: int, new_data: bool, change: DataChange | None = None) -> dict[str, Any]:
        return {"from_step": from_step, "manifest": self.manifest, "splits": _plain_splits(self.splits),
                "entries": len(self.entries), "new_data": new_data,
                "added": len(change.added) if change else 0, "removed": len(change.removed) if change else 0,
                "changed": len(change.changed) if change else 0}

    def record(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint's ``data`` value."""
        return {"splits": _plain_splits(self.splits), "entries": [list(e) for e in self.entries],
                "history": list(history)}


def _plain_splits(splits: tuple[str, ...] | None) -> list[str] | None:
    return None if splits is None else list(splits)


def describe_splits(splits: Sequence[str] | None) -> str:
    return "every entry (no --splits)" if splits is None else f"--splits {','.join(splits)}"


@dataclass
class DataChange:
    """What differs between a checkpoint's data and the data of a resume."""

    splits: tuple[Any, Any] | None = None
    """``(the run's, now)`` when the selected splits differ."""
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    """Ids whose images, series, modality or subject differ."""
    reordered: bool = False

    def __bool__(self) -> bool:
        return bool(self.splits or self.added or self.removed or self.changed or self.reordered)

    def describe(self) -> str:
        """One line naming every kind of change, with up to :data:`SHOWN_IDS` ids each."""
        parts = []
        if self.splits:
            parts.append(f"splits: the run was started on {describe_splits(self.splits[0])}, this resume asks for "
                         f"{describe_splits(self.splits[1])}")
        for ids, what in ((self.removed, "removed"), (self.added, "added"),
                          (self.changed, "changed (images, series, modality or subject)")):
            if ids:
                shown = ", ".join(ids[:SHOWN_IDS]) + (f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else "")
                parts.append(f"{len(ids)} {'entry' if len(ids) == 1 else 'entries'} {what}: {shown}")
        if self.reordered:
            parts.append("the same entries in another order")
        return "; ".join(parts)


def compare(saved: dict[str, Any], current: RunData) -> DataChange:
    """What differs between a checkpoint's ``data`` record and ``current``."""
    change = DataChange()
    saved_splits = None if saved.get("splits") is None else tuple(saved["splits"])
    if saved_splits != current.splits:
        change.splits = (saved_splits, current.splits)
    old = [(str(i), str(f)) for i, f in saved["entries"]]
    old_ids, new_ids = dict(old), dict(current.entries)
    change.removed = [i for i, _ in old if i not in new_ids]
    change.added = [i for i, _ in current.entries if i not in old_ids]
    change.changed = [i for i, f in old if i in new_ids and new_ids[i] != f]
    if not (change.removed or change.added or change.changed):
        change.reordered = [i for i, _ in old] != [i for i, _ in current.entries]
    return change
