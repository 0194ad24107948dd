"""``volpre check``: open every entry of a manifest and report each problem with its cause.

Every image (each channel) and label is read in full with volpre's checked reader, so
everything training would trip over shows up here first: missing or unreadable files,
truncated archives, non-finite voxels, wrong dimensionality, broken DICOM series, labels off
the image grid or holding non-class values, header facts in the manifest (``shape``,
``spacing``) that disagree with the file, and entries without a modality volpre has a preset for.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from volpre.data.errors import EntryProblem, VolumeError
from volpre.data.manifest import ManifestEntry
from volpre.data.readers import read_volume
from volpre.data.transforms import check_label_values, check_modality, check_same_grid

SPACING_RTOL = 1e-3


@dataclass
class CheckReport:
    n_entries: int = 0
    problems: list[EntryProblem] = field(default_factory=list)

    @property
    def bad_entries(self) -> set[str]:
        return {p.entry_id for p in self.problems}

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """A small table: entries checked, good and bad, and problems per kind."""
        n_bad = len(self.bad_entries)
        lines = [f"checked {self.n_entries} entries: {self.n_entries - n_bad} ok, {n_bad} with problems"]
        if self.problems:
            counts = Counter(p.kind for p in self.problems)
            width = max(len(k) for k in counts) + 2
            lines.append(f"{'problem':<{width}}count")
            lines += [f"{kind:<{width}}{count}" for kind, count in sorted(counts.items())]
        return "\n".join(lines)


def _problem(entry: ManifestEntry, error: VolumeError) -> EntryProblem:
    return EntryProblem.from_error(entry.id, error)


def check_entry(entry: ManifestEntry) -> list[EntryProblem]:
    """All problems of one entry (an empty list when it is good)."""
    problems: list[EntryProblem] = []
    try:
        check_modality(entry.modality, str(entry.image[0]))
    except VolumeError as error:
        problems.append(_problem(entry, error))
    images = []
    for path in entry.image:
        try:
            images.append(read_volume(path, series_uid=entry.series_uid))
        except VolumeError as error:
            problems.append(_problem(entry, error))
    reference = images[0] if len(images) == len(entry.image) else None
    if reference is not None:
        for path, channel in zip(entry.image[1:], images[1:]):
            try:
                check_same_grid(reference, channel, str(path), f"channel 0 ({entry.image[0]})")
            except VolumeError as error:
                problems.append(_problem(entry, error))
        problems += _header_mismatches(entry, reference)
    if entry.label is not None:
        problems += _check_label(entry, reference)
    return problems


def _header_mismatches(entry: ManifestEntry, image: torch.Tensor) -> list[EntryProblem]:
    problems = []
    shape = tuple(int(s) for s in image.shape[1:])
    if entry.shape is not None and tuple(entry.shape) != shape:
        problems.append(EntryProblem(entry.id, str(entry.image[0]), "manifest-mismatch",
                                f"manifest says shape {list(entry.shape)}, the file has {list(shape)}"))
    spacing = np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0)
    if entry.spacing is not None and not np.allclose(entry.spacing, spacing, rtol=SPACING_RTOL):
        problems.append(EntryProblem(entry.id, str(entry.image[0]), "manifest-mismatch",
                                f"manifest says spacing {list(entry.spacing)} mm, the file has "
                                f"{[round(float(s), 6) for s in spacing]} mm"))
    return problems


def _check_label(entry: ManifestEntry, image) -> list[EntryProblem]:
    try:
        label = read_volume(entry.label)
        if image is not None:
            check_same_grid(image, label, str(entry.label), f"its image ({entry.image[0]})")
        check_label_values(label, str(entry.label))
    except VolumeError as error:
        return [_problem(entry, error)]
    return []


class _CheckEach(torch.utils.data.Dataset):
    """``dataset[i]``: the problems of entry ``i`` (checked in a DataLoader worker)."""

    def __init__(self, entries: Sequence[ManifestEntry]):
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> list[EntryProblem]:
        return check_entry(self.entries[index])


def _as_is(item):
    return item


def check_entries(entries: Iterable[ManifestEntry], on_problem: Callable[[EntryProblem], None] | None = None,
                  on_entry: Callable[[], None] | None = None, workers: int = 0) -> CheckReport:
    """Check entries, reporting problems in manifest order as they are found.

    ``workers`` = 0 checks them one at a time in this process (memory holds one volume);
    ``workers`` = N > 0 in N DataLoader worker processes (memory holds about 3 N volumes: each
    worker prefetches two).
    """
    report = CheckReport()
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    if workers == 0:
        results: Iterable[list[EntryProblem]] = (check_entry(entry) for entry in entries)
    else:
        listed = entries if isinstance(entries, Sequence) else list(entries)
        results = torch.utils.data.DataLoader(_CheckEach(listed), batch_size=None, shuffle=False,
                                              num_workers=workers, collate_fn=_as_is)
    for problems in results:
        report.n_entries += 1
        for problem in problems:
            report.problems.append(problem)
            if on_problem is not None:
                on_problem(problem)
        if on_entry is not None:
            on_entry()
    return report

