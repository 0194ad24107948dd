"""``volpre index``: walk folders and write a manifest, one entry per volume file or DICOM series.

Headers only, where headers suffice: NIfTI/NRRD/MetaImage headers give ``shape`` and
``spacing``; DICOM files are scanned with ``stop_before_pixels``, grouped by SeriesInstanceUID
within their folder, sorted and checked (see :mod:`volpre.data.dicom`). The modality of a
non-DICOM file comes from a ``--modality`` rule, else its JSON sidecar, BIDS suffix or header,
else its voxel values (:mod:`volpre.data.modality`; only this last step reads pixels), and the
entry records which (``modality_source``).

Whatever cannot be used goes to the manifest's ``rejected`` list with the reason: series with
problems, 4D images, non-image DICOM objects, localizers, single slices, files whose modality
nothing decides, and what cannot be read at all: unreadable files and folders (permissions),
symbolic link loops, broken links, damaged headers. None of these stops the index. Other files
(reports, JSON, PNG, ...), special files (FIFOs, sockets, devices: never opened) and hidden
folders (``.volpre_cache``, ``.git``, ...) are ignored.

It streams: the main process walks the tree one folder at a time and writes entries as folders
are done, so memory is bounded by the largest folder, not the tree (100k files are fine).
Folders are visited in sorted order and written in that order, so the same tree always gives
the same manifest, with any number of ``workers`` (DataLoader worker processes that each index
whole folders).
"""

from __future__ import annotations

import errno
import fnmatch
import heapq
import os
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TextIO

import numpy as np
import torch

from volpre.data.dicom import scan_dicom
from volpre.data.errors import VolumeError
from volpre.data.manifest import ManifestEntry, ManifestWriter, derive_entry_id, relative_path
from volpre.data.modality import MODALITY_CODE, decide_modality
from volpre.data.readers import read_header, read_volume, volume_format
from volpre.errors import UserInputError
from volpre.progress import Progress
from volpre.text import printable

UNDECIDED_SHOWN = 10
"""Files without a modality that :meth:`IndexSummary.describe` names one by one (the rest are counted)."""



class IndexOptionError(UserInputError, ValueError):
    """An option of ``volpre index`` is malformed (a ``--modality`` rule, ``--workers``)."""


@dataclass
class IndexSummary:
    manifest: Path
    files_seen: int = 0
    entries: int = 0
    rejected: int = 0
    ignored: int = 0
    """Files that are neither volumes nor DICOM (reports, JSON, images, detached .raw data, ...)."""
    undecided: int = 0
    """Volume files left out because nothing decided their modality (counted in ``rejected`` too)."""
    undecided_examples: list[tuple[str, str]] = field(default_factory=list)
    """The first :data:`UNDECIDED_SHOWN` of them: (path as in the manifest, reason)."""
    seconds: float = 0.0

    @property
    def files_per_s(self) -> float:
        return self.files_seen / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        """The summary line, preceded by one line per file without a modality (control characters escaped)."""
        lines = [f"{printable(path)}: modality: {printable(reason)}" for path, reason in self.undecided_examples]
        if self.undecided > len(self.undecided_examples):
            lines.append(f"... and {self.undecided - len(self.undecided_examples)} more files without a modality")
        if self.undecided:
            files = "1 volume file has" if self.undecided == 1 else f"{self.undecided} volume files have"
            lines.append(f"{files} no modality (rejected; see 'rejected' in the manifest): give it with "
                         "--modality CODE or --modality 'PATTERN=CODE'")
        lines.append(
            f"indexed {self.files_seen} files in {self.seconds:.1f} s ({self.files_per_s:.0f} files/s): "
            f"{self.entries} entries, {self.rejected} rejected, {self.ignored} ignored; "
            f"manifest: {printable(self.manifest)}"
        )
        return "\n".join(lines)


def parse_modality_rules(values: Sequence[str]) -> list[tuple[str, str]]:
    """``["CT"]`` or ``["*/ct*=CT", "*/mr*=MR"]`` -> ``[(pattern, code), ...]`` (first match wins).

    A bare code applies to every non-DICOM file; ``PATTERN=CODE`` to files whose path relative
    to the indexed folder matches the shell pattern (``fnmatch``, case-insensitive).
    """
    rules = []
    for value in values:
        pattern, _, code = value.rpartition("=") if "=" in value else ("*", "", value)
        if not MODALITY_CODE.match(code) or not pattern:
            raise IndexOptionError(
                f"--modality {value!r}: expected a DICOM modality code (CT, MR, PT, ...) or PATTERN=CODE "
                "(e.g. '*/ct*=CT')"
            )
        rules.append((pattern, code))
    return rules


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def os_error_reason(exc: OSError, what: str = "file") -> str:
    """``kind: reason`` for a file or folder the operating system will not give us (no path: the record has it)."""
    if exc.errno == errno.ELOOP:
        return f"unreadable: symbolic link loop (too many levels of symbolic links); {what} not followed"
    if exc.errno == errno.ENOENT:
        return f"missing: broken symbolic link (its target does not exist); {what} not read"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"unreadable: permission denied; {what} not read"
    return f"unreadable: {exc.strerror or type(exc).__name__}; {what} not read"


# ----------------------------------------------------------------------------- jobs: one folder each


@dataclass(frozen=True)
class FolderJob:
    """One folder to index (or one that could not be listed: ``error`` holds why)."""

    ordinal: int
    """Position in the walk: results are written in this order."""
    root: Path
    """The PATH argument being walked (``--modality`` patterns match paths relative to it)."""
    folder: Path
    files: tuple[Path, ...] = ()
    error: str | None = None


@dataclass
class SeriesFound:
    """A DICOM series as a worker found it; the main process checks it against other folders'."""

    uid: str
    folder: Path
    problem: str | None
    entry: ManifestEntry | None


@dataclass
class FolderResult:
    """What indexing one folder found, in order: ``items`` are ``("entry", ManifestEntry)``,
    ``("reject", path, reason)``, ``("undecided", path, reason)`` or ``("series", SeriesFound)``."""

    ordinal: int
    items: list[tuple] = field(default_factory=list)
    files_seen: int = 0
    ignored: int = 0


@dataclass(frozen=True)
class IndexSettings:
    """What every worker needs besides the job (picklable)."""

    rules: tuple[tuple[str, str], ...]
    base_dir: Path
    """The manifest's folder (entry ids are paths relative to it)."""
    out: Path
    """The manifest being written (never indexed itself)."""


def walk_jobs(paths: Sequence[Path]) -> Iterator[FolderJob]:
    """One job per folder under ``paths`` in sorted order (a file given directly is a job of its
    own); a folder that cannot be listed is a job with ``error`` (``os.walk``'s ``onerror``)."""
    ordinal = 0
    for root in paths:
        root = Path(root)
        if root.is_file():
            yield FolderJob(ordinal, root.parent, root.parent, (root,))
            ordinal += 1
            continue
        errors: list[OSError] = []
        for folder, dirs, files in os.walk(root, onerror=errors.append):
            for error in errors:
                yield FolderJob(ordinal, root, Path(error.filename or folder), error=os_error_reason(error, "folder"))
                ordinal += 1
            errors.clear()
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .volpre_cache, .git, ...
            yield FolderJob(ordinal, root, Path(folder), tuple(Path(folder) / name for name in sorted(files)))
            ordinal += 1
        for error in errors:  # the root itself, or the last folder visited
            yield FolderJob(ordinal, root, Path(error.filename or root), error=os_error_reason(error, "folder"))
            ordinal += 1


def _probe(path: Path) -> str | None:
    """None if ``path`` is a regular file we can read; ``"special"`` for FIFOs, sockets and
    devices (never opened: a FIFO would block); else the rejection reason."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return os_error_reason(exc)
    if not stat.S_ISREG(mode):
        return "special"
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        return os_error_reason(exc)
    return None


def _is_output(path: Path, settings: IndexSettings) -> bool:
    if path.name.startswith(f".{settings.out.name}.tmp") or path.name == settings.out.name:
        try:
            return path.resolve() in (settings.out, settings.out.parent / path.name)
        except (OSError, RuntimeError):  # a link loop is not our manifest
            return False
    return False


class _FolderIndexer:
    """Indexes the files of one folder into a :class:`FolderResult`."""

    def __init__(self, job: FolderJob, settings: IndexSettings):
        self.job, self.settings = job, settings
        self.result = FolderResult(job.ordinal)

    def modality_rule(self, path: Path) -> str | None:
        root = self.job.root
        relative = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        for pattern, code in self.settings.rules:
            if fnmatch.fnmatch(relative.lower(), pattern.lower()):
                return code
        return None

    def image_id(self, image: Path, series_uid: str | None = None) -> str:
        return derive_entry_id(relative_path(image, self.settings.base_dir), series_uid)

    def run(self) -> FolderResult:
        if self.job.error is not None:
            self.result.items.append(("reject", self.job.folder, self.job.error))
            return self.result
        dicom_files, unreadable = [], []
        for path in self.job.files:
            if _is_output(path, self.settings):
                continue
            self.result.files_seen += 1
            problem = _probe(path)
            if problem == "special":
                self.result.ignored += 1
                continue
            if problem is not None:
                self.result.items.append(("reject", path, problem))
                unreadable.append((path, problem))
                continue
            fmt = volume_format(path)
            if fmt == "dicom":
                dicom_files.append(path)
            elif fmt is not None:
                self.add_volume_file(path)
            else:
                self.result.ignored += 1
        if dicom_files:
            self.add_dicom_folder(dicom_files, unreadable)
        return self.result

    def add_volume_file(self, path: Path) -> None:
        items = self.result.items
        try:
            header = read_header(path)
            if header.n_frames > 1:
                items.append(("reject", path, f"dimensionality: 4D image with {header.n_frames} frames; "
                                              "a manifest entry must be a 3D volume (extract the frame you want)"))
                return
            rule = self.modality_rule(path)
            if rule is not None:
                modality, source = rule, "rule"
            else:
                decision = decide_modality(path, header.modality,
                                           read_voxels=lambda: np.asarray(read_volume(path).as_tensor()))
                if decision.modality is None:
                    items.append(("undecided", path, f"cannot decide: {decision.reason}"))
                    return
                modality, source = decision.modality, decision.source
        except VolumeError as error:
            items.append(("reject", path, f"{error.kind}: {error.reason}"))
            return
        except OSError as error:  # the file went away or became unreadable while we read it
            items.append(("reject", path, os_error_reason(error)))
            return
        items.append(("entry", ManifestEntry(image=(path,), id=self.image_id(path), modality=modality,
                                             modality_source=source, shape=header.shape, spacing=header.spacing)))

    def add_dicom_folder(self, files: list[Path], unreadable: list[tuple[Path, str]]) -> None:
        folder = self.job.folder
        scan = scan_dicom(files)
        for skipped in scan.skipped:
            self.result.items.append(("reject", skipped.path, f"{skipped.kind}: {skipped.reason}"))
        for series in scan.series:
            problem = None
            if series.problems:
                problem = f"dicom-series: {series.problem_report()}"
                if unreadable:
                    first_path, first_reason = unreadable[0]
                    problem += (f" ({len(unreadable)} file(s) of this folder could not be read, e.g. "
                                f"{first_path.name}: {first_reason}; missing slices may be among them)")
                self.result.items.append(("series", SeriesFound(series.uid, folder, problem, None)))
                continue
            single_file = len(series.files) == 1  # an Enhanced multi-frame file is a volume on its own
            image = series.files[0] if single_file else folder
            rule = self.modality_rule(image)
            modality, source = (series.modality, "dicom-header") if series.modality else (rule, "rule")
            if modality is None:
                problem = (f"modality: cannot decide: DICOM series {series.uid} has no Modality (0008,0060) and "
                           "no --modality rule matches it")
            entry = ManifestEntry(
                image=(image,), id=self.image_id(image, None if single_file else series.uid),
                subject=series.patient_id or None, modality=modality, modality_source=source,
                series_uid=series.uid, shape=series.shape, spacing=_spacing(series.affine),
            )
            self.result.items.append(("series", SeriesFound(series.uid, folder, problem, entry)))


def index_folder(job: FolderJob, settings: IndexSettings) -> FolderResult:
    """Index one folder (in whichever process runs it)."""
    return _FolderIndexer(job, settings).run()


class _Jobs:
    """The walk, as the DataLoader's sampler: the main process walks, workers index folders."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = paths

    def __iter__(self) -> Iterator[FolderJob]:
        return walk_jobs(self.paths)


class _IndexFolders(torch.utils.data.Dataset):
    """``dataset[job]`` indexes the folder of ``job`` (the sampler hands out jobs, not integers)."""

    def __init__(self, settings: IndexSettings):
        self.settings = settings

    def __getitem__(self, job: FolderJob) -> FolderResult:
        return index_folder(job, self.settings)


def _as_is(item):
    return item


def _in_walk_order(results: Iterable[FolderResult]) -> Iterator[FolderResult]:
    """Results in ordinal order, whatever order the workers finish them in."""
    pending: list[tuple[int, int, FolderResult]] = []
    expected = 0
    for arrival, result in enumerate(results):
        heapq.heappush(pending, (result.ordinal, arrival, result))
        while pending and pending[0][0] == expected:
            yield heapq.heappop(pending)[2]
            expected += 1
    assert not pending, f"folders {[p[0] for p in pending]} came back, but folder {expected} never did"


def index_paths(paths: Iterable[Path], out: Path, modality: str | Sequence[str] | None = None,
                progress: bool = True, workers: int = 0, progress_every: float = 30.0,
                progress_stream: TextIO | None = None) -> IndexSummary:
    """Walk ``paths`` and write the manifest ``out``; returns counts and throughput.

    Args:
        paths: folders (walked) or files.
        out: the manifest to write (atomically).
        modality: rules that give non-DICOM files (and DICOM series without a Modality) their
            modality: a code for all of them, or ``PATTERN=CODE`` rules (see
            :func:`parse_modality_rules`). They override what :mod:`volpre.data.modality` decides.
        progress: show progress on ``progress_stream`` (default stderr): a bar on a terminal,
            else a line every ``progress_every`` seconds (what a batch job's log shows).
        workers: DataLoader worker processes indexing folders in parallel (0: this process).

    Raises:
        FileNotFoundError: a path does not exist.
        IndexOptionError: a malformed ``modality`` rule, or ``workers`` < 0.
    """
    rules = parse_modality_rules([modality] if isinstance(modality, str) else list(modality or []))
    if workers < 0:
        raise IndexOptionError(f"--workers must be >= 0, got {workers}")
    paths = [Path(p) for p in paths]
    for root in paths:
        if not (root.is_file() or root.is_dir()):
            raise FileNotFoundError(f"volpre index: {root}: no such file or folder")
    out = Path(out)
    summary = IndexSummary(manifest=out)
    start = time.perf_counter()
    meter = Progress("indexing", "file", stream=progress_stream or sys.stderr, every=progress_every,
                     enabled=progress)
    with ManifestWriter(out, description="written by volpre index") as writer:
        settings = IndexSettings(tuple(rules), writer.base_dir, out.resolve())
        if workers == 0:
            results: Iterable[FolderResult] = (index_folder(job, settings) for job in walk_jobs(paths))
        else:
            results = _in_walk_order(torch.utils.data.DataLoader(
                _IndexFolders(settings), sampler=_Jobs(paths), batch_size=None, num_workers=workers,
                collate_fn=_as_is, in_order=False))
        series_folders: dict[str, Path] = {}
        for result in results:
            _write(result, writer, summary, series_folders)
            meter.update(result.files_seen, entries=summary.entries, rejected=summary.rejected)
    meter.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _write(result: FolderResult, writer: ManifestWriter, summary: IndexSummary,
           series_folders: dict[str, Path]) -> None:
    summary.files_seen += result.files_seen
    summary.ignored += result.ignored
    for item in result.items:
        kind = item[0]
        if kind == "entry":
            writer.add(item[1])
            summary.entries += 1
        elif kind == "reject":
            writer.reject(item[1], item[2])
            summary.rejected += 1
        elif kind == "undecided":
            writer.reject(item[1], f"modality: {item[2]}")
            summary.rejected += 1
            summary.undecided += 1
            if len(summary.undecided_examples) < UNDECIDED_SHOWN:
                summary.undecided_examples.append((writer.rejected[-1].path, item[2]))
        else:
            series: SeriesFound = item[1]
            if series.uid in series_folders:
                writer.reject(series.folder, f"dicom-series: series {series.uid} was already found in "
                                             f"{series_folders[series.uid]}; a series split over folders is not "
                                             "supported (gather its files into one folder)")
                summary.rejected += 1
                continue
            series_folders[series.uid] = series.folder
            if series.problem is not None:
                writer.reject(series.folder, series.problem)
                summary.rejected += 1
            else:
                writer.add(series.entry)
                summary.entries += 1
