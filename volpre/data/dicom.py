"""DICOM checks MONAI lacks: stream headers into series, reject what is not a regular volume.

:func:`scan_dicom` reads only a few header fields of each file (never pixels), groups the
files by SeriesInstanceUID and skips, with a reason, whatever cannot be a slice of a 3D
volume: non-image objects (SEG, RTSTRUCT, SR, presentation states, KO, RT plans and doses: any
SOP class whose name lacks "Image Storage"), localizers (ImageType holds LOCALIZER), colour
images, 2D images with no position in patient space (CR, DX, ...), single-slice series and
files that are not DICOM at all.

Every remaining series is a :class:`DicomSeries` with its slices sorted by position along the
slice normal (the cross product of the ImageOrientationPatient row and column cosines; never
by file name or InstanceNumber) and the list of ``problems`` that stop it from being read as a
volume: mixed image sizes, pixel spacings or orientations, duplicate positions, missing slices,
uneven spacing and gantry tilt. Tolerances, all module constants:

- orientations agree when every cosine differs by at most :data:`ORIENTATION_TOLERANCE`;
- pixel spacings agree within :data:`PIXEL_SPACING_TOLERANCE_MM`;
- two slices closer than :data:`DUPLICATE_TOLERANCE_MM` along the normal share a position;
- a gap wider than :data:`MISSING_SLICE_FACTOR` times the median gap means missing slices;
- otherwise every slice must lie within :data:`SLICE_POSITION_TOLERANCE` of a voxel (a fraction
  of the slice spacing along the normal, of the smaller pixel spacing across it) of the evenly
  spaced stack running from the first slice along the normal to the last: beyond it along the
  normal the spacing is uneven, beyond it across the normal the stack is tilted.

A slice is either a single-frame file or one frame of an Enhanced (multi-frame) CT/MR file,
whose geometry comes from the functional groups; both pass the same checks.
:func:`load_dicom_series` reads the pixels of a problem-free series and applies each slice's
RescaleSlope/RescaleIntercept (Hounsfield units for CT).

Coordinates: DICOM positions and orientations are LPS millimetres, as in the files; every
affine here maps voxel indices to world RAS millimetres.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import nibabel.orientations as nio
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import UID

from volpre.data.errors import VolumeError
from volpre.data.geometry import LPS_TO_RAS
from volpre.text import one_line

ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between direction cosines of slices that share an orientation."""
PIXEL_SPACING_TOLERANCE_MM = 1e-3
"""Largest difference between pixel spacings of slices that share a pixel spacing."""
DUPLICATE_TOLERANCE_MM = 1e-2
"""Slices closer than this along the normal share one position (a duplicate)."""
MISSING_SLICE_FACTOR = 1.5
"""A gap wider than this times the median gap between neighbouring slices means missing slices."""
SLICE_POSITION_TOLERANCE = 0.1
"""How far (in voxels) a slice may lie from the evenly spaced, untilted stack through its series."""

DICOM_SUFFIXES = (".dcm", ".dicom")
"""File suffixes taken as DICOM without reading the file."""
_MAGIC_OFFSET, _MAGIC = 128, b"DICM"
_SCAN_TAGS = [
    Tag(keyword)
    for keyword in (
        "SpecificCharacterSet", "ImageType", "SOPClassUID", "Modality", "SeriesDescription", "PatientID",
        "StudyInstanceUID", "SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient",
        "NumberOfFrames", "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "PixelSpacing",
        "RescaleIntercept", "RescaleSlope", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
    )
]


# ----------------------------------------------------------------------------- data classes


@dataclass(frozen=True, slots=True)
class DicomSlice:
    """One 2D image of a series: a single-frame file, or one frame of a multi-frame file."""

    path: Path
    frame: int | None
    """Index of the frame in a multi-frame file (0-based); ``None`` for a single-frame file."""
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    """(row spacing, column spacing) in mm: between neighbouring rows, between neighbouring columns."""
    orientation: tuple[float, float, float, float, float, float]
    """ImageOrientationPatient: row direction cosines, then column direction cosines (LPS)."""
    position: tuple[float, float, float]
    """ImagePositionPatient: centre of the first pixel, LPS mm."""
    rescale_slope: float
    rescale_intercept: float

    @property
    def name(self) -> str:
        """File name, with the frame for a multi-frame file (for messages)."""
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame}"


@dataclass(frozen=True, slots=True)
class SkippedFile:
    """A file :func:`scan_dicom` did not put in any series, and why.

    ``kind`` is a :data:`volpre.data.errors.ERROR_KINDS` value: ``"unreadable"`` (not DICOM or
    unparsable), ``"not-an-image"`` (SEG, RTSTRUCT, SR, ..., localizers), ``"non-scalar"``
    (colour) or ``"dimensionality"`` (2D images without a 3D position, single-slice series).
    """

    path: Path
    kind: str
    reason: str


@dataclass
class DicomSeries:
    """The slices of one SeriesInstanceUID, sorted along the slice normal, and their problems.

    ``rows``, ``cols``, ``pixel_spacing`` and ``orientation`` are those of the first slice,
    ``origin_lps`` its ImagePositionPatient. ``slice_spacing``, ``affine`` and ``shape``
    describe the regular voxel grid the slices form and are ``None`` when ``problems`` is not
    empty (then the slices form no such grid and the series is never read). ``affine`` and
    ``shape`` are those of the volume :func:`volpre.data.readers.read_volume` returns: reoriented
    to RAS, ``affine`` float64 4x4 voxel index -> world RAS mm, ``shape`` ``(X, Y, Z)``.
    """

    uid: str
    modality: str | None
    description: str
    study_uid: str | None
    patient_id: str | None
    files: list[Path]
    """Files in slice order (a multi-frame file appears once)."""
    slices: list[DicomSlice]
    """Slices sorted by position along the slice normal (ties by file name and frame)."""
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    orientation: tuple[float, float, float, float, float, float]
    origin_lps: tuple[float, float, float]
    slice_spacing: float | None
    """Distance between neighbouring slices along the normal, mm."""
    affine: np.ndarray | None
    shape: tuple[int, int, int] | None
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line naming the series for messages: UID, modality, description, slice count."""
        text = f"{self.uid} ({self.modality or 'no modality'}, {self.description!r}, {len(self.slices)} slices)"
        return text + (f" [rejected: {'; '.join(self.problems)}]" if self.problems else "")

    def problem_report(self) -> str:
        """Why the series cannot be read, naming it and listing every problem."""
        return f"DICOM series {self.uid} ({len(self.slices)} slices) is not a regular volume: " + "; ".join(
            self.problems
        )


@dataclass
class DicomScan:
    """What :func:`scan_dicom` found: series (with or without problems) and skipped files."""

    series: list[DicomSeries]
    skipped: list[SkippedFile]


# ----------------------------------------------------------------------------- scanning


def looks_like_dicom_file(path: str | os.PathLike[str]) -> bool:
    """True for a ``.dcm``/``.dicom`` file (not read) or a file with ``DICM`` at byte 128.

    Reads at most the first 132 bytes; False for directories, missing or unreadable files.
    """
    path = Path(path)
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return path.is_file()
    try:
        with open(path, "rb") as handle:
            head = handle.read(_MAGIC_OFFSET + len(_MAGIC))
    except OSError:
        return False
    return head[_MAGIC_OFFSET:] == _MAGIC


def scan_dicom(files: Iterable[Path], progress: Callable[[int], None] | None = None) -> DicomScan:
    """Group DICOM ``files`` into series from their headers alone, skipping what is no slice.

    Args:
        files: paths of any kind; files that are not DICOM are skipped (kind ``"unreadable"``).
        progress: called after each file with the number of files scanned so far.

    Memory stays bounded by a few numbers per slice: datasets and pixels are never kept.
    Series are ordered by their first file path.
    """
    parts: dict[str, _SeriesParts] = {}
    skipped: list[SkippedFile] = []
    count = 0
    for path in files:
        path = Path(path)
        found = _scan_file(path)
        if isinstance(found, SkippedFile):
            skipped.append(found)
        else:
            uid, identity, slices = found
            series = parts.setdefault(uid, _SeriesParts(identity))
            series.slices.extend(slices)
        count += 1
        if progress is not None:
            progress(count)

    series_list = []
    for uid, series in parts.items():
        if len(series.slices) == 1:
            only, identity = series.slices[0], series.identity
            skipped.append(
                SkippedFile(
                    only.path,
                    "dimensionality",
                    f"single-slice series {uid} ({identity.modality or 'no modality'}, {identity.description!r}): "
                    "1 image; expected at least 2 slices to form a 3D volume (for a series, pass the directory "
                    "holding all of it)",
                )
            )
        else:
            series_list.append(_build_series(uid, series.identity, series.slices))
    series_list.sort(key=lambda s: min(str(p) for p in s.files))
    return DicomScan(series=series_list, skipped=skipped)


class _SeriesIdentity(NamedTuple):
    """Series-level fields, read once per series (from its first file scanned)."""

    modality: str | None
    description: str
    study_uid: str | None
    patient_id: str | None


class _SeriesParts:
    """Slices of one series gathered while scanning, with its identity."""

    __slots__ = ("identity", "slices")

    def __init__(self, identity: _SeriesIdentity):
        self.identity = identity
        self.slices: list[DicomSlice] = []


class _BadValue(ValueError):
    """A header value that does not convert to what a slice needs (a property of the file)."""


def _read_header(path: Path) -> Dataset:
    """The scan fields of ``path``, every value decoded; files without a preamble (old ``.dcm``) are
    read with force. Raises whatever pydicom raises for a file it cannot parse."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_SCAN_TAGS)
    except InvalidDicomError:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_SCAN_TAGS, force=True)
    for _element in ds.iterall():  # pydicom decodes values on first access: here, not in our code below
        pass
    return ds


def _scan_file(path: Path) -> tuple[str, _SeriesIdentity, list[DicomSlice]] | SkippedFile:
    """``(series uid, identity, slices)`` for a file that holds volume slices, else a SkippedFile.

    A file pydicom cannot parse, or whose values do not convert, is skipped as ``unreadable``; any
    other error (a bug in volpre, a memory error) is raised.
    """
    if not looks_like_dicom_file(path):
        return SkippedFile(path, "unreadable", f"not a DICOM file (no 'DICM' marker at byte {_MAGIC_OFFSET})")
    try:
        ds = _read_header(path)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom's own errors, of many types: the file is broken
        return SkippedFile(path, "unreadable", f"unreadable DICOM header: {type(exc).__name__}: {one_line(exc)}")
    try:
        return _slices_of(path, ds)
    except _BadValue as exc:
        return SkippedFile(path, "unreadable", f"unreadable DICOM header: {exc}")


def _slices_of(path: Path, ds: Dataset) -> tuple[str, _SeriesIdentity, list[DicomSlice]] | SkippedFile:
    """The checks of one DICOM object, in the order a file fails them, each returning a SkippedFile
    that names the problem (or the slices of a good file). Long because it is one flat sequence of
    guard clauses."""
    sop_class = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    modality = _text(ds, "Modality")
    if sop_class is None:
        return SkippedFile(path, "unreadable", "not a DICOM object: no SOP Class UID")
    sop_class = UID(str(sop_class))
    known = sop_class.name != str(sop_class)
    if (known and "Image Storage" not in sop_class.name) or (not known and ds.get("Rows") is None):
        what = sop_class.name if known else f"private SOP class {sop_class}"
        return SkippedFile(
            path, "not-an-image",
            f"holds a {what} object (Modality {modality or 'none'}), not an image; expected CT/MR slices",
        )
    image_type = [str(v).upper() for v in _values(ds.get("ImageType"))]
    if "LOCALIZER" in image_type:
        shown = "\\".join(image_type)
        return SkippedFile(
            path, "not-an-image", f"a localizer (scout) image (ImageType {shown}), not a slice of a volume"
        )
    samples = _int(ds.get("SamplesPerPixel") or 1, "SamplesPerPixel")
    if samples != 1:
        return SkippedFile(
            path, "non-scalar",
            f"colour image ({samples} samples per pixel, {_text(ds, 'PhotometricInterpretation')}); "
            "expected one grey value per pixel",
        )
    uid = _text(ds, "SeriesInstanceUID")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if uid is None or rows is None or cols is None:
        missing = [k for k, v in (("SeriesInstanceUID", uid), ("Rows", rows), ("Columns", cols)) if v is None]
        return SkippedFile(path, "unreadable", f"DICOM image without {', '.join(missing)}")
    identity = _SeriesIdentity(
        modality, _text(ds, "SeriesDescription") or "", _text(ds, "StudyInstanceUID"), _text(ds, "PatientID")
    )
    n_frames = _int(ds.get("NumberOfFrames") or 1, "NumberOfFrames")
    if "PerFrameFunctionalGroupsSequence" in ds:
        slices = _frames_of(path, ds, _int(rows, "Rows"), _int(cols, "Columns"), n_frames)
    elif n_frames > 1:
        return SkippedFile(
            path, "dimensionality",
            f"multi-frame image ({n_frames} frames, Modality {modality or 'none'}) without per-frame positions "
            "(PerFrameFunctionalGroupsSequence); expected slices of a volume",
        )
    else:
        geometry = {
            k: ds.get(k) for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
        }
        missing = [k for k, v in geometry.items() if not _values(v)]
        if missing:
            return SkippedFile(
                path, "dimensionality",
                f"2D image without {', '.join(missing)} (Modality {modality or 'none'}): it cannot be placed in 3D; "
                "expected a slice of a volume",
            )
        slices = [
            _make_slice(
                path, None, rows, cols, geometry["PixelSpacing"], geometry["ImageOrientationPatient"],
                geometry["ImagePositionPatient"], ds.get("RescaleSlope"), ds.get("RescaleIntercept"),
            )
        ]
    if isinstance(slices, SkippedFile):
        return slices
    return uid, identity, slices


def _frames_of(path: Path, ds: Dataset, rows: int, cols: int, n_frames: int) -> list[DicomSlice] | SkippedFile:
    """One DicomSlice per frame of an Enhanced multi-frame file (functional groups), or a SkippedFile."""
    per_frame = ds.PerFrameFunctionalGroupsSequence
    shared_groups = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_groups[0] if shared_groups else Dataset()
    if len(per_frame) != n_frames:
        return SkippedFile(
            path, "unreadable",
            f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items; expected one per frame ({n_frames})",
        )
    slices = []
    for frame, item in enumerate(per_frame):
        position = _macro(item, shared, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _macro(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _macro(item, shared, "PixelMeasuresSequence", "PixelSpacing")
        missing = [k for k, v in (("ImagePositionPatient", position), ("ImageOrientationPatient", orientation),
                                  ("PixelSpacing", spacing)) if v is None]
        if missing:
            return SkippedFile(
                path, "dimensionality",
                f"multi-frame image whose frame {frame} has no {', '.join(missing)} in its functional groups: "
                "it cannot be placed in 3D",
            )
        slope = _macro(item, shared, "PixelValueTransformationSequence", "RescaleSlope", ds.get("RescaleSlope"))
        intercept = _macro(
            item, shared, "PixelValueTransformationSequence", "RescaleIntercept", ds.get("RescaleIntercept")
        )
        slices.append(_make_slice(path, frame, rows, cols, spacing, orientation, position, slope, intercept))
    return slices


def _macro(item: Dataset, shared: Dataset, sequence: str, keyword: str, default=None):
    """``keyword`` from the first item of functional group ``sequence``: per-frame first, then shared."""
    for group in (item, shared):
        items = group.get(sequence)
        if items and _values(items[0].get(keyword)):
            return items[0].get(keyword)
    return default


def _make_slice(path, frame, rows, cols, spacing, orientation, position, slope, intercept) -> DicomSlice:
    return DicomSlice(
        path=path,
        frame=frame,
        rows=_int(rows, "Rows"),
        cols=_int(cols, "Columns"),
        pixel_spacing=_floats(spacing, 2, "PixelSpacing"),
        orientation=_floats(orientation, 6, "ImageOrientationPatient"),
        position=_floats(position, 3, "ImagePositionPatient"),
        rescale_slope=1.0 if slope in (None, "") else _floats(slope, 1, "RescaleSlope")[0],
        rescale_intercept=0.0 if intercept in (None, "") else _floats(intercept, 1, "RescaleIntercept")[0],
    )


def _values(value) -> list:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]


def _floats(value, count: int, keyword: str) -> tuple[float, ...]:
    """``count`` finite numbers from a header value, or :class:`_BadValue` naming ``keyword``."""
    try:
        numbers = [float(v) for v in _values(value)]
    except (TypeError, ValueError) as exc:
        raise _BadValue(f"{keyword} holds {_shown(value)}; expected {count} numbers") from exc
    if len(numbers) != count or not np.all(np.isfinite(numbers)):
        raise _BadValue(f"{keyword} holds {numbers}; expected {count} finite numbers")
    return tuple(numbers)


def _int(value, keyword: str) -> int:
    """A header value as an integer, or :class:`_BadValue` naming ``keyword``."""
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise _BadValue(f"{keyword} holds {_shown(value)}; expected an integer") from exc


def _shown(value) -> str:
    return repr(value)[:80]


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return None if value is None or str(value) == "" else str(value)


# ----------------------------------------------------------------------------- series checks


def _build_series(uid: str, identity: _SeriesIdentity, slices: list[DicomSlice]) -> DicomSeries:
    slices = sorted(slices, key=lambda s: (str(s.path), -1 if s.frame is None else s.frame))
    problems = _mixed_value_problems(slices)
    orientations_agree = not any(p.startswith("mixed orientations") for p in problems)
    row_dir, col_dir = np.array(slices[0].orientation[:3]), np.array(slices[0].orientation[3:])
    if not (
        abs(np.linalg.norm(row_dir) - 1) <= ORIENTATION_TOLERANCE
        and abs(np.linalg.norm(col_dir) - 1) <= ORIENTATION_TOLERANCE
        and abs(row_dir @ col_dir) <= ORIENTATION_TOLERANCE
    ):
        problems.append(
            f"ImageOrientationPatient {list(slices[0].orientation)} in {slices[0].name} is not two orthogonal "
            "unit vectors"
        )
    elif orientations_agree:  # one valid orientation: order the slices along its normal
        normal = _slice_normal(slices[0].orientation)
        along = np.array([s.position for s in slices]) @ normal
        slices = [slices[i] for i in np.argsort(along, kind="stable")]  # ties keep file/frame order
        problems += _stack_problems(slices, normal)
    first, last = slices[0], slices[-1]
    series = DicomSeries(
        uid=uid,
        modality=identity.modality,
        description=identity.description,
        study_uid=identity.study_uid,
        patient_id=identity.patient_id,
        files=list(dict.fromkeys(s.path for s in slices)),
        slices=slices,
        rows=first.rows,
        cols=first.cols,
        pixel_spacing=first.pixel_spacing,
        orientation=first.orientation,
        origin_lps=first.position,
        slice_spacing=None,
        affine=None,
        shape=None,
        problems=problems,
    )
    if not problems:
        normal = _slice_normal(first.orientation)
        series.slice_spacing = float((np.array(last.position) - first.position) @ normal / (len(slices) - 1))
        series.affine, series.shape = ras_grid(stack_affine(series), (first.cols, first.rows, len(slices)))
    return series


def _slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal (LPS) of slices with ImageOrientationPatient ``orientation``: row x column."""
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / np.linalg.norm(normal)


def _mixed_value_problems(slices: Sequence[DicomSlice]) -> list[str]:
    """Problems of slices that disagree on image size, pixel spacing or orientation."""
    problems = []
    sizes = Counter((s.rows, s.cols) for s in slices)
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c} in {n} slice(s)" for (r, c), n in sizes.most_common())
        problems.append(f"mixed image sizes (rows x columns): {listed}; expected one size")
    for label, tolerance, values, unit in (
        ("pixel spacings", PIXEL_SPACING_TOLERANCE_MM, [s.pixel_spacing for s in slices], " mm"),
        ("orientations (ImageOrientationPatient)", ORIENTATION_TOLERANCE, [s.orientation for s in slices], ""),
    ):
        groups = _group_close(values, tolerance)
        if len(groups) > 1:
            shown = ", ".join(f"{[round(v, 4) for v in value]}{unit} in {n} slice(s)" for value, n in groups[:4])
            more = f" and {len(groups) - 4} more" if len(groups) > 4 else ""
            problems.append(f"mixed {label}: {len(groups)} distinct values: {shown}{more}; expected one")
    return problems


def _group_close(values: Sequence[tuple[float, ...]], tolerance: float) -> list[tuple[tuple[float, ...], int]]:
    """Distinct values (within ``tolerance`` of a group's first value) with counts, most common first."""
    groups: list[list] = []
    for value, count in Counter(values).items():
        for group in groups:
            if max(abs(a - b) for a, b in zip(group[0], value)) <= tolerance:
                group[1] += count
                break
        else:
            groups.append([value, count])
    return sorted(((tuple(v), n) for v, n in groups), key=lambda g: -g[1])


def _stack_problems(slices: Sequence[DicomSlice], normal: np.ndarray) -> list[str]:
    """Duplicate positions, missing slices, uneven spacing and tilt of slices sorted along ``normal``."""
    positions = np.array([s.position for s in slices])
    along = positions @ normal
    gaps = np.diff(along)
    problems = []
    duplicate = gaps < DUPLICATE_TOLERANCE_MM
    if duplicate.any():
        where = np.flatnonzero(duplicate)
        shown = "; ".join(f"{slices[i].name} and {slices[i + 1].name} at {along[i]:.3f} mm" for i in where[:3])
        more = f" (and {len(where) - 3} more pairs)" if len(where) > 3 else ""
        problems.append(
            f"duplicate slice positions: {len(where)} pair(s) of slices share a position along the normal: "
            f"{shown}{more}; expected one slice per position"
        )
    distinct = np.concatenate([along[:1], along[1:][~duplicate]])
    if len(distinct) < 2:
        return problems
    distinct_gaps = np.diff(distinct)
    median_gap = float(np.median(distinct_gaps))
    wide = np.flatnonzero(distinct_gaps > MISSING_SLICE_FACTOR * median_gap)
    if len(wide):
        shown = "; ".join(
            f"{distinct_gaps[i]:.3f} mm between {distinct[i]:.3f} and {distinct[i + 1]:.3f} mm "
            f"(about {round(distinct_gaps[i] / median_gap) - 1} missing slice(s))"
            for i in wide[:3]
        )
        more = f" (and {len(wide) - 3} more gaps)" if len(wide) > 3 else ""
        problems.append(
            f"missing slices: {len(wide)} gap(s) wider than {MISSING_SLICE_FACTOR} x the median spacing "
            f"{median_gap:.3f} mm: {shown}{more}"
        )
    if not problems:  # evenly spaced? (meaningless once duplicates or gaps are reported)
        step = (along[-1] - along[0]) / (len(slices) - 1)
        off_grid = np.abs(along - (along[0] + step * np.arange(len(slices))))
        worst = int(np.argmax(off_grid))
        if off_grid[worst] > SLICE_POSITION_TOLERANCE * step:
            problems.append(
                f"non-uniform slice spacing: gaps range from {gaps.min():.4f} to {gaps.max():.4f} mm, and "
                f"{slices[worst].name} lies {off_grid[worst]:.4f} mm ({off_grid[worst] / step:.2f} of a spacing) "
                f"from the evenly spaced stack; expected every slice within {SLICE_POSITION_TOLERANCE} of a spacing"
            )
    offsets = positions - positions[0]
    sideways = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    worst = int(np.argmax(sideways))
    if sideways[worst] > SLICE_POSITION_TOLERANCE * min(slices[0].pixel_spacing):
        angle = np.degrees(np.arctan2(sideways[-1], abs(offsets[-1] @ normal)))
        problems.append(
            f"gantry tilt: slice positions drift {sideways[worst]:.3f} mm sideways from the slice normal "
            f"({slices[worst].name}), a tilt of {angle:.2f} degrees; expected slices stacked along the normal "
            f"(within {SLICE_POSITION_TOLERANCE} of a pixel)"
        )
    return problems


# ----------------------------------------------------------------------------- geometry and pixels


def stack_affine(series: DicomSeries) -> np.ndarray:
    """Voxel -> world RAS affine (float64 4x4) of a problem-free series' stack before reorientation.

    Voxel axes of the stack: column index, row index, slice index in ``series.slices`` order.
    """
    if series.problems:
        raise VolumeError(_series_dir(series), "dicom-series", series.problem_report())
    row_dir, col_dir = np.array(series.orientation[:3]), np.array(series.orientation[3:])
    lps = np.eye(4)
    lps[:3, 0] = row_dir / np.linalg.norm(row_dir) * series.pixel_spacing[1]
    lps[:3, 1] = col_dir / np.linalg.norm(col_dir) * series.pixel_spacing[0]
    lps[:3, 2] = _slice_normal(series.orientation) * series.slice_spacing
    lps[:3, 3] = series.origin_lps
    return LPS_TO_RAS @ lps


def ras_grid(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of a 3D voxel grid after reorienting its axes to RAS.

    Uses nibabel's orientation algebra (the same MONAI's ``Orientation(axcodes="RAS")`` uses):
    each voxel axis is permuted and flipped to the world axis it is closest to, pointing
    towards Right, Anterior, Superior. ``affine`` maps voxel index -> world RAS mm.
    """
    transform = _to_ras_transform(affine)
    new_affine = np.asarray(affine, dtype=np.float64) @ nio.inv_ornt_aff(transform, shape)
    new_shape = [0, 0, 0]
    for axis, (target, _flip) in enumerate(transform):
        new_shape[int(target)] = int(shape[axis])
    return new_affine, tuple(new_shape)


def reorient_to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` ``(X, Y, Z)`` with its axes permuted and flipped to RAS, and its new affine."""
    transform = _to_ras_transform(affine)
    new_affine, _ = ras_grid(affine, volume.shape)
    return np.ascontiguousarray(nio.apply_orientation(volume, transform)), new_affine


def _to_ras_transform(affine: np.ndarray) -> np.ndarray:
    return nio.ornt_transform(nio.io_orientation(np.asarray(affine, dtype=np.float64)), nio.axcodes2ornt("RAS"))


def load_dicom_series(series: DicomSeries) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of a problem-free series, rescaled per slice, and the stack's affine.

    Returns:
        ``volume`` float32 ``(cols, rows, n_slices)``: slice ``k`` of ``series.slices`` is
        ``volume[:, :, k]``, with each slice's ``stored * RescaleSlope + RescaleIntercept``
        (Hounsfield units for CT); and :func:`stack_affine` (float64 4x4, voxel -> world RAS
        mm). :func:`reorient_to_ras` turns them into ``series.shape`` / ``series.affine``.

    Raises:
        VolumeError: ``"dicom-series"`` if the series has problems, ``"truncated"`` if a file
        holds fewer pixel bytes than its header promises, ``"unreadable"`` if pixels cannot be
        decoded (e.g. a compressed transfer syntax without its decoder plugin installed).
    """
    affine = stack_affine(series)
    volume = np.empty((series.cols, series.rows, len(series.slices)), dtype=np.float32)
    indices_by_file: dict[Path, list[int]] = {}
    for k, item in enumerate(series.slices):
        indices_by_file.setdefault(item.path, []).append(k)
    for path, indices in indices_by_file.items():
        pixels = _read_pixels(path, series)
        for k in indices:
            item = series.slices[k]
            if item.frame is None:
                frame = pixels
            else:  # pydicom drops the frame axis of a one-frame file
                frame = (pixels[None] if pixels.ndim == 2 else pixels)[item.frame]
            if frame.shape != (series.rows, series.cols):
                raise VolumeError(
                    _series_dir(series), "unreadable",
                    f"{item.name}: pixel array of shape {frame.shape}; expected rows x columns "
                    f"{series.rows}x{series.cols} as in its header",
                )
            volume[:, :, k] = frame.T * item.rescale_slope + item.rescale_intercept
    return volume, affine


def _read_pixels(path: Path, series: DicomSeries) -> np.ndarray:
    """Stored pixel values of ``path``: ``(rows, cols)``, or ``(frames, rows, cols)`` if multi-frame."""
    where = _series_dir(series)
    try:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            ds = pydicom.dcmread(path, force=True)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom's own errors, of many types: the file is broken
        raise VolumeError(where, "unreadable", f"{path.name}: unreadable DICOM file: {one_line(exc)}") from exc
    if "PixelData" not in ds:
        raise VolumeError(where, "unreadable", f"{path.name}: no pixel data; expected an image")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        frames = int(ds.get("NumberOfFrames") or 1)
        bits = int(ds.get("BitsAllocated") or 16)
        expected = (int(ds.Rows) * int(ds.Columns) * frames * int(ds.get("SamplesPerPixel") or 1) * bits + 7) // 8
        if len(ds.PixelData) < expected:
            raise VolumeError(
                where, "truncated",
                f"{path.name}: holds {len(ds.PixelData)} bytes of pixel data; its header promises {expected} "
                f"({ds.Rows}x{ds.Columns} pixels x {frames} frames x {bits} bits)",
            )
    try:
        return ds.pixel_array
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - the pixel decoders' own errors: the data cannot be decoded
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise VolumeError(
            where, "unreadable",
            f"{path.name}: cannot decode pixel data ({name}): {one_line(exc)}. Compressed DICOM needs a pydicom "
            "decoder plugin (e.g. pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)",
        ) from exc


def _series_dir(series: DicomSeries) -> str:
    return os.path.commonpath([str(p.parent) for p in series.files])


