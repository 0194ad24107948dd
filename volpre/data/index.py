"""``volpre index``: walk folders and write a manifest, one entry per volume file or DICOM series.

Headers only: NIfTI/NRRD/MetaImage headers give ``shape`` and ``spacing``; DICOM files are
scanned with ``stop_before_pixels``, grouped by SeriesInstanceUID within their folder, sorted
and checked (see :mod:`volpre.data.dicom`). Whatever cannot be used goes to the manifest's
``rejected`` list with the reason: series with problems, 4D images, unreadable files, non-image
DICOM objects, localizers, single slices. Other files (reports, JSON, PNG, ...) and hidden
folders (``.volpre_cache``, ``.git``, ...) are ignored.

It streams: one folder at a time, entries written as they are found, so memory is bounded by
the largest folder, not the tree (100k files are fine). Folders are visited in sorted order,
so the same tree always gives the same manifest.
"""

from __future__ import annotations

import fnmatch
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from volpre.data.dicom import DicomSeries, scan_dicom
from volpre.data.errors import VolumeError
from volpre.data.manifest import ManifestEntry, ManifestWriter, derive_entry_id, relative_path
from volpre.data.readers import read_header, volume_format


@dataclass
class IndexSummary:
    manifest: Path
    files_seen: int = 0
    entries: int = 0
    rejected: int = 0
    ignored: int = 0
    """Files that are neither volumes nor DICOM (reports, JSON, images, detached .raw data, ...)."""
    seconds: float = 0.0

    @property
    def files_per_s(self) -> float:
        return self.files_seen / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        return (
            f"indexed {self.files_seen} files in {self.seconds:.1f} s ({self.files_per_s:.0f} files/s): "
            f"{self.entries} entries, {self.rejected} rejected, {self.ignored} ignored; manifest: {self.manifest}"
        )


def _walk(paths: Iterable[Path]) -> Iterator[tuple[Path, Path, list[Path]]]:
    """Yield ``(root, folder, files)`` in sorted order; a file given directly forms its own group."""
    for root in paths:
        root = Path(root)
        if root.is_file():
            yield root.parent, root.parent, [root]
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"volpre index: {root}: no such file or folder")
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .volpre_cache, .git, ...
            yield root, Path(folder), [Path(folder) / name for name in sorted(files)]


MODALITY_CODE = re.compile(r"^[A-Z]{2,3}$")


def parse_modality_rules(values: Sequence[str]) -> list[tuple[str, str]]:
    """``["CT"]`` or ``["*/ct*=CT", "*/mr*=MR"]`` -> ``[(pattern, code), ...]`` (first match wins).

    A bare code applies to every non-DICOM file; ``PATTERN=CODE`` to files whose path relative
    to the indexed folder matches the shell pattern (``fnmatch``, case-insensitive).
    """
    rules = []
    for value in values:
        pattern, _, code = value.rpartition("=") if "=" in value else ("*", "", value)
        if not MODALITY_CODE.match(code) or not pattern:
            raise ValueError(
                f"--modality {value!r}: expected a DICOM modality code (CT, MR, PT, ...) or PATTERN=CODE "
                "(e.g. '*/ct*=CT')"
            )
        rules.append((pattern, code))
    return rules


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


class _Indexer:
    def __init__(self, writer: ManifestWriter, modality_rules: list[tuple[str, str]], summary: IndexSummary):
        self.writer, self.modality_rules, self.summary = writer, modality_rules, summary
        self.series_folders: dict[str, Path] = {}
        self.root: Path | None = None
        """The folder being walked (modality patterns match paths relative to it)."""

    def modality_of(self, path: Path) -> str | None:
        relative = path.relative_to(self.root).as_posix() if self.root and path.is_relative_to(self.root) else path.name
        for pattern, code in self.modality_rules:
            if fnmatch.fnmatch(relative.lower(), pattern.lower()):
                return code
        return None

    def _image_id(self, image: Path, series_uid: str | None = None) -> str:
        return derive_entry_id(relative_path(image, self.writer.base_dir), series_uid)

    def _reject(self, path: Path, reason: str) -> None:
        self.writer.reject(path, reason)
        self.summary.rejected += 1

    def add_volume_file(self, path: Path) -> None:
        try:
            header = read_header(path)
        except VolumeError as error:
            self._reject(path, f"{error.kind}: {error.reason}")
            return
        if header.n_frames > 1:
            self._reject(path, f"dimensionality: 4D image with {header.n_frames} frames; "
                               "a manifest entry must be a 3D volume (extract the frame you want)")
            return
        self.writer.add(ManifestEntry(image=(path,), id=self._image_id(path), modality=self.modality_of(path),
                                      shape=header.shape, spacing=header.spacing))
        self.summary.entries += 1

    def add_dicom_folder(self, folder: Path, files: list[Path]) -> None:
        scan = scan_dicom(files)
        for skipped in scan.skipped:
            self._reject(skipped.path, f"{skipped.kind}: {skipped.reason}")
        for series in scan.series:
            self._add_series(folder, series)

    def _add_series(self, folder: Path, series: DicomSeries) -> None:
        if series.uid in self.series_folders:
            self._reject(folder, f"dicom-series: series {series.uid} was already found in "
                                 f"{self.series_folders[series.uid]}; a series split over folders is not "
                                 "supported (gather its files into one folder)")
            return
        self.series_folders[series.uid] = folder
        if series.problems:
            self._reject(folder, f"dicom-series: {series.problem_report()}")
            return
        single_file = len(series.files) == 1  # an Enhanced multi-frame file is a volume on its own
        image = series.files[0] if single_file else folder
        self.writer.add(ManifestEntry(
            image=(image,), id=self._image_id(image, None if single_file else series.uid),
            subject=series.patient_id or None, modality=series.modality or self.modality_of(image),
            series_uid=series.uid, shape=series.shape, spacing=_spacing(series.affine),
        ))
        self.summary.entries += 1


def index_paths(paths: Iterable[Path], out: Path, modality: str | Sequence[str] | None = None,
                progress: bool = True) -> IndexSummary:
    """Walk ``paths`` and write the manifest ``out``; returns counts and throughput.

    ``modality`` gives non-DICOM files their modality (DICOM series use their header): a code
    for all of them, or ``PATTERN=CODE`` rules (see :func:`parse_modality_rules`).
    """
    rules = parse_modality_rules([modality] if isinstance(modality, str) else list(modality or []))
    out = Path(out)
    summary = IndexSummary(manifest=out)
    start = time.perf_counter()
    bar = tqdm(unit="file", disable=not progress, desc="indexing")
    with ManifestWriter(out, description="written by volpre index") as writer:
        indexer = _Indexer(writer, rules, summary)
        for root, folder, files in _walk(paths):
            indexer.root = root
            dicom_files = []
            for path in files:
                if path.parent.resolve() == writer.base_dir and path.name.startswith(f".{out.name}.tmp"):
                    continue  # the manifest being written
                if path.resolve() == out.resolve():
                    continue
                summary.files_seen += 1
                bar.update(1)
                fmt = volume_format(path)
                if fmt == "dicom":
                    dicom_files.append(path)
                elif fmt is not None:
                    indexer.add_volume_file(path)
                else:
                    summary.ignored += 1
            if dicom_files:
                indexer.add_dicom_folder(folder, dicom_files)
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary
