"""Read one checked 3D volume, in RAS, from NIfTI, NRRD, MetaImage or DICOM.

- :func:`read_volume` returns a ``MetaTensor`` ``(1, X, Y, Z)`` float32 whose axes are
  reoriented to RAS and whose ``.affine`` (float64 4x4) maps voxel index -> world RAS mm.
- :func:`read_header` returns the same grid (shape, spacing, affine) without reading pixels.
- :func:`volume_format` classifies a path from its name and at most its first 132 bytes.

Libraries do the reading: nibabel for ``.nii``/``.nii.gz`` (scaling applied), SimpleITK for
``.nrrd``/``.nhdr`` and ``.mha``/``.mhd`` (LPS converted to RAS), pydicom through
:mod:`volpre.data.dicom` for a DICOM series directory or an Enhanced multi-frame file.

Integrity is checked here, because the readers do not (ITK reads a truncated ``.nii.gz`` as
zeros; ITK inflates a damaged ``.mha``/``.nrrd`` stream and nibabel stops before the gzip
checksum, both returning wrong voxels): a file shorter than its header promises raises
``"truncated"`` (uncompressed files are measured against the header; compressed streams are
decompressed in full and their checksum and length verified, a damaged one raises
``"unreadable"``); NaN/Inf voxels raise
``"non-finite"``; 2D images, single DICOM slices and 4D images without ``frame`` raise
``"dimensionality"``; RGB/vector/complex voxels raise ``"non-scalar"``. Every failure is a
:class:`~volpre.data.errors.VolumeError` naming the path; a library's own exception is kept
as its ``__cause__``.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from volpre.data.dicom import (
    DicomScan,
    DicomSeries,
    load_dicom_series,
    looks_like_dicom_file,
    ras_grid,
    reorient_to_ras,
    scan_dicom,
)
from volpre.data.errors import VolumeError
from volpre.data.geometry import LPS_TO_RAS

try:  # ISA-L's inflate: same streams and checks as zlib's, faster (see gunzip)
    from isal import igzip as _isal_gzip
except ImportError:
    _isal_gzip = None

FILE_FORMATS: dict[str, tuple[str, ...]] = {
    "nifti": (".nii", ".nii.gz"),
    "nrrd": (".nrrd", ".nhdr"),
    "metaimage": (".mha", ".mhd"),
}
"""Volume formats recognised by file name (DICOM is recognised by name or content)."""
_SITK_IO = {"nrrd": "NrrdImageIO", "metaimage": "MetaImageIO"}
_SITK_SCALAR_BYTES = {
    sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
    sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat32: 4, sitk.sitkFloat64: 8,
}
_HEADER_READ_LIMIT = 1 << 16
"""Bytes read to find where a MetaImage/NRRD header ends."""


@dataclass(frozen=True, eq=False)
class VolumeHeader:
    """Grid of the volume :func:`read_volume` would return, read without pixel data."""

    shape: tuple[int, int, int]
    """``(X, Y, Z)`` voxels after reorientation to RAS."""
    spacing: tuple[float, float, float]
    """Voxel size in mm along each RAS-reoriented voxel axis."""
    affine: np.ndarray
    """float64 4x4, voxel index -> world RAS mm (read-only)."""
    modality: str | None
    """DICOM Modality; for NRRD/MetaImage the modality code its header states (an NRRD key-value
    pair ``modality:=CT``, a MetaImage ``Modality = MET_MOD_CT``), if any; else ``None``."""
    series_uid: str | None
    """DICOM SeriesInstanceUID; ``None`` for other formats."""
    n_frames: int
    """Frames of a 4D image (choose one with ``read_volume(..., frame=K)``); 1 otherwise."""


def volume_format(path: str | os.PathLike[str]) -> str | None:
    """``"nifti"``, ``"nrrd"``, ``"metaimage"``, ``"dicom"`` or ``None`` (anything else).

    Files are classified by name (see :data:`FILE_FORMATS`; ``.dcm``/``.dicom`` are DICOM), else
    DICOM when ``DICM`` sits at byte 128 (suffix-less, ``.IMA``, UID-named files). A directory is
    ``"dicom"`` when it directly holds a DICOM file. Reads at most 132 bytes per file examined.
    """
    path = Path(path)
    if path.is_dir():
        try:
            with os.scandir(path) as entries:
                return "dicom" if any(e.is_file() and looks_like_dicom_file(e.path) for e in entries) else None
        except OSError:  # unreadable directory
            return None
    name = path.name.lower()
    for fmt, suffixes in FILE_FORMATS.items():
        if name.endswith(suffixes):
            return fmt
    return "dicom" if looks_like_dicom_file(path) else None


def read_header(path: str | os.PathLike[str], *, series_uid: str | None = None) -> VolumeHeader:
    """Shape, spacing and affine of the volume at ``path`` in RAS, without reading pixels.

    Agrees with :func:`read_volume` and raises the same errors where headers suffice to tell
    (missing, unreadable, uncompressed truncation, dimensionality, non-scalar, DICOM series
    problems); truncated compressed data and non-finite voxels show only when pixels are read.
    A 4D image is not an error here: ``n_frames`` says how many frames it has.
    """
    path = _existing(path)
    fmt = _format_of(path)
    if fmt == "dicom":
        series = _dicom_series(path, series_uid)
        affine, shape = series.affine, series.shape
        modality, uid, n_frames = series.modality, series.uid, 1
    else:
        _reject_series_uid(path, fmt, series_uid)
        source = _open_file(path, fmt)
        affine, shape = ras_grid(source.affine, source.shape)
        modality, uid, n_frames = source.header_modality, None, source.n_frames
    affine = np.array(affine, dtype=np.float64)
    affine.setflags(write=False)
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    return VolumeHeader(shape=shape, spacing=spacing, affine=affine, modality=modality, series_uid=uid,
                        n_frames=n_frames)


def read_volume(path: str | os.PathLike[str], *, series_uid: str | None = None,
                frame: int | None = None) -> MetaTensor:
    """Read and check one 3D volume; return it reoriented to RAS.

    Args:
        path: a ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr``/``.mha``/``.mhd`` file, a multi-frame
            (Enhanced CT/MR) DICOM file, or a directory holding one DICOM series (searched
            recursively).
        series_uid: the SeriesInstanceUID to read when a directory holds several series.
        frame: the frame (0-based) to read from a 4D image; must be ``None`` for 3D images.

    Returns:
        MetaTensor ``(1, X, Y, Z)`` float32 (CT in Hounsfield units; other values as stored,
        scaled by the file's slope/intercept), ``.affine`` float64 4x4 voxel -> world RAS mm.
        Meta holds ``filename_or_obj`` and ``space`` (``"RAS"``); for DICOM also ``modality``
        and ``series_uid``.

    Raises:
        VolumeError: kinds ``missing``, ``unreadable``, ``truncated``, ``non-finite``,
            ``dimensionality``, ``bad-frame``, ``non-scalar``, ``not-an-image``,
            ``dicom-series``, ``multiple-series``, ``unknown-series``.
    """
    path = _existing(path)
    fmt = _format_of(path)
    meta: dict = {"filename_or_obj": str(path)}
    if fmt == "dicom":
        if frame is not None:
            raise VolumeError(path, "bad-frame", f"frame={frame!r} given, but DICOM series are 3D; frame applies to 4D "
                                                 "NIfTI/NRRD/MetaImage files only")
        series = _dicom_series(path, series_uid)
        try:
            data, affine = load_dicom_series(series)
        except VolumeError as err:
            raise VolumeError(path, err.kind, err.reason) from err
        meta.update(modality=series.modality, series_uid=series.uid)
    else:
        _reject_series_uid(path, fmt, series_uid)
        source = _open_file(path, fmt)
        data = source.read(_frame_index(path, source, frame))
        affine = source.affine
        if source.header_modality is not None:
            meta["modality"] = source.header_modality
    _check_finite(path, data)
    data, affine = reorient_to_ras(data, affine)
    meta["space"] = "RAS"
    return MetaTensor(torch.from_numpy(data)[None], affine=torch.from_numpy(affine), meta=meta)


# ----------------------------------------------------------------------------- shared checks


def _existing(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.exists():
        raise VolumeError(path, "missing", "no such file or directory")
    return path


def _format_of(path: Path) -> str:
    if path.is_dir():
        return "dicom"  # a directory is read as DICOM, searched recursively
    fmt = volume_format(path)
    if fmt is None:
        known = ", ".join(s for suffixes in FILE_FORMATS.values() for s in suffixes)
        raise VolumeError(path, "unreadable", f"unknown format: expected a {known} file, a DICOM file or a DICOM "
                                              "series directory")
    return fmt


def _reject_series_uid(path: Path, fmt: str, series_uid: str | None) -> None:
    if series_uid is not None:
        raise VolumeError(path, "unknown-series", f"series_uid {series_uid!r} given, but this is a {fmt} file, which "
                                                  "holds no DICOM series")


def _frame_index(path: Path, source: _FileSource, frame: int | None) -> int | None:
    """Validated frame index for ``source.read`` (``None`` for a 3D image)."""
    if frame is not None and (not isinstance(frame, (int, np.integer)) or isinstance(frame, bool)):
        raise VolumeError(path, "bad-frame", f"frame must be an integer, got {frame!r}")
    if not source.has_frame_axis:
        if frame is not None:
            raise VolumeError(path, "bad-frame", f"frame={frame} given, but the image is 3D {source.shape}; frame "
                                                 "applies to 4D images only")
        return None
    n = source.n_frames
    if frame is None:
        if n == 1:
            return 0
        raise VolumeError(path, "dimensionality", f"4D image with {n} frames; expected a 3D volume "
                                                  f"(pass frame=K with 0 <= K < {n} to choose one)")
    if not 0 <= frame < n:
        raise VolumeError(path, "bad-frame", f"frame={frame} is out of range: the 4D image has {n} frames "
                                             f"(expected 0 <= frame < {n})")
    return int(frame)


def _check_spatial(path: Path, spatial: tuple[int, ...]) -> None:
    if len(spatial) < 3 or min(spatial) < 2:
        size = "x".join(map(str, spatial))
        raise VolumeError(path, "dimensionality", f"2D image ({size}); expected a 3D volume with at least 2 voxels "
                                                  "along each axis")


def _check_finite(path: Path, data: np.ndarray) -> None:
    finite = np.isfinite(data)
    if not finite.all():
        n_bad = int(finite.size - np.count_nonzero(finite))
        n_nan = int(np.count_nonzero(np.isnan(data)))
        raise VolumeError(path, "non-finite", f"{n_bad} of {finite.size} voxels are not finite ({n_nan} NaN, "
                                              f"{n_bad - n_nan} infinite); expected finite values")


def _describe_bytes(shape: tuple[int, ...], components: int, itemsize: int) -> str:
    size = "x".join(map(str, shape))
    return f"{size} voxels x {components} component(s) x {itemsize} bytes" if components != 1 else \
        f"{size} voxels x {itemsize} bytes"


# ----------------------------------------------------------------------------- file formats


class _FileSource(Protocol):
    """A single-file volume opened at its header: native grid, frames, and a pixel reader."""

    affine: np.ndarray  # float64 4x4, voxel -> world RAS mm, native voxel axes
    shape: tuple[int, int, int]  # native spatial shape
    n_frames: int
    has_frame_axis: bool
    header_modality: str | None  # the header's own modality field, as written (see VolumeHeader.modality)

    def read(self, frame: int | None) -> np.ndarray:
        """float32 voxels of ``shape`` (of ``frame`` for a 4D image)."""


def _open_file(path: Path, fmt: str) -> _FileSource:
    return _NiftiSource(path) if fmt == "nifti" else _SimpleITKSource(path, fmt)


class _NiftiSource:
    """``.nii``/``.nii.gz`` through nibabel (sform, else qform; scl_slope/scl_inter applied)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.image = nib.load(path, mmap=False)
        except EOFError as exc:
            raise VolumeError(path, "truncated", f"compressed file ends inside the NIfTI header: "
                                                 f"{_library_message(exc, path)}") from exc
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise VolumeError(path, "unreadable", f"corrupt compressed data: {_library_message(exc, path)}") from exc
        except Exception as exc:
            raise VolumeError(path, "unreadable", f"not a readable NIfTI file: {_library_message(exc, path)}") from exc
        if not isinstance(self.image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise VolumeError(path, "unreadable", f"nibabel reads it as {type(self.image).__name__}; expected NIfTI")
        header = self.image.header
        dtype = self.image.get_data_dtype()
        full_shape = tuple(int(v) for v in self.image.shape)
        if dtype.names is not None or dtype.kind == "c":
            kind = "RGB" if dtype.names is not None else "complex"
            raise VolumeError(path, "non-scalar", f"{kind} voxels (NIfTI dtype {dtype}); expected one real value "
                                                  "per voxel")
        if len(full_shape) >= 5 and math.prod(full_shape[4:]) > 1:
            raise VolumeError(path, "non-scalar", f"vector image of shape {full_shape} ({math.prod(full_shape[4:])} "
                                                  "components per voxel); expected one value per voxel")
        _check_spatial(path, full_shape[:3])
        self.full_shape = full_shape
        self.shape = full_shape[:3]
        self.has_frame_axis = len(full_shape) >= 4
        self.n_frames = full_shape[3] if self.has_frame_axis else 1
        self.header_modality: str | None = None  # NIfTI headers have no modality field
        self.affine = np.asarray(self.image.affine, dtype=np.float64)
        if not path.name.lower().endswith(".gz"):
            offset = int(header.get_data_offset())
            expected = math.prod(full_shape) * dtype.itemsize
            available = path.stat().st_size - offset
            if available < expected:
                what = _describe_bytes(full_shape, 1, dtype.itemsize)
                raise VolumeError(path, "truncated", f"holds {max(available, 0)} bytes of pixel data; its header "
                                                     f"promises {expected} ({what})")

    def read(self, frame: int | None) -> np.ndarray:
        image = self.image
        if self.path.name.lower().endswith(".gz"):
            # Decompress the whole stream ourselves: gzip then checks its CRC and length, which a
            # reader that stops after the last voxel byte (nibabel's) never does.
            try:
                image = type(self.image).from_bytes(gunzip(self.path.read_bytes()))
            except EOFError as exc:
                raise VolumeError(self.path, "truncated", f"compressed pixel data ends early: "
                                                          f"{_library_message(exc, self.path)}") from exc
            except (gzip.BadGzipFile, zlib.error) as exc:
                raise VolumeError(self.path, "unreadable", f"corrupt compressed data: "
                                                           f"{_library_message(exc, self.path)}") from exc
        extra = len(self.full_shape) - 4
        index = (...,) if frame is None else (slice(None),) * 3 + (frame,) + (0,) * extra
        try:
            data = image.dataobj[index]
        except Exception as exc:
            raise VolumeError(self.path, "unreadable", f"NIfTI pixel data cannot be read: "
                                                       f"{_library_message(exc, self.path)}") from exc
        return np.asarray(data, dtype=np.float32).reshape(self.shape)


def gunzip(data: bytes) -> bytes:
    """Decompress a whole gzip stream (every member), verifying each member's CRC-32 and length.

    Uses ISA-L (the ``isal`` package: about 2.6x faster than zlib on CT volumes) when it is
    installed, else the standard library. Errors are the standard library's own: when ISA-L
    rejects a stream, the standard library decodes it again, so a damaged file raises the same
    ``EOFError`` / ``gzip.BadGzipFile`` / ``zlib.error`` whichever decoder is installed.
    """
    if _isal_gzip is None:
        return gzip.decompress(data)
    try:
        return _isal_gzip.decompress(data)
    except Exception:  # noqa: BLE001 - classified below by the reference decoder
        return gzip.decompress(data)


class _SimpleITKSource:
    """``.nrrd``/``.nhdr``/``.mha``/``.mhd`` through SimpleITK (its LPS geometry converted to RAS)."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt = path, fmt
        self.reader = sitk.ImageFileReader()
        self.reader.SetImageIO(_SITK_IO[fmt])
        self.reader.SetFileName(str(path))
        self.layout = _metaimage_layout(path) if fmt == "metaimage" else _nrrd_layout(path)
        if self.layout is not None and not self.layout.data_file.is_file():
            raise VolumeError(path, "missing", f"pixel data file {self.layout.data_file} named in the header does "
                                               "not exist")
        try:
            self.reader.ReadImageInformation()
        except RuntimeError as exc:
            raise VolumeError(path, "unreadable", f"not a readable {fmt} file: {_itk_message(exc, path)}") from exc
        size = tuple(int(v) for v in self.reader.GetSize())
        dimension = self.reader.GetDimension()
        components = self.reader.GetNumberOfComponents()
        pixel_id = self.reader.GetPixelID()
        if components != 1 or pixel_id not in _SITK_SCALAR_BYTES:
            raise VolumeError(path, "non-scalar", f"voxels are {sitk.GetPixelIDValueAsString(pixel_id)} with "
                                                  f"{components} component(s); expected one real value per voxel")
        if dimension > 4:
            raise VolumeError(path, "dimensionality", f"{dimension}D image {size}; expected a 3D volume")
        _check_spatial(path, size[:3] if dimension >= 3 else size)
        self.size = size
        self.shape = size[:3]
        self.has_frame_axis = dimension == 4
        self.n_frames = size[3] if self.has_frame_axis else 1
        keys = {key.lower(): key for key in self.reader.GetMetaDataKeys()}
        self.header_modality = _header_modality(self.reader.GetMetaData(keys["modality"])) if "modality" in keys \
            else None
        direction = np.array(self.reader.GetDirection(), dtype=np.float64).reshape(dimension, dimension)[:3, :3]
        lps = np.eye(4)
        lps[:3, :3] = direction * np.array(self.reader.GetSpacing()[:3])
        lps[:3, 3] = self.reader.GetOrigin()[:3]
        self.affine = LPS_TO_RAS @ lps
        self.itemsize = _SITK_SCALAR_BYTES[pixel_id]
        self.n_bytes = math.prod(size) * self.itemsize
        self._check_stored_size()

    def read(self, frame: int | None) -> np.ndarray:
        self._verify_compressed_stream()
        if frame is not None:  # read one 3D frame: extraction size 0 drops the frame axis
            self.reader.SetExtractIndex([0, 0, 0, frame])
            self.reader.SetExtractSize([*self.shape, 0])
        try:
            image = self.reader.Execute()
        except RuntimeError as exc:
            raise VolumeError(self.path, "unreadable", f"{self.fmt} pixel data cannot be read: "
                                                       f"{_itk_message(exc, self.path)}") from exc
        array = sitk.GetArrayViewFromImage(image)  # (Z, Y, X)
        return np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.float32)

    def _where(self) -> str:
        return "" if self.layout.data_file == self.path else f" in {self.layout.data_file.name}"

    def _check_stored_size(self) -> None:
        """Raise ``truncated`` if the file holds fewer pixel bytes than the header promises (no decoding)."""
        layout = self.layout
        if layout is None or (layout.compressed and layout.compressed_size is None):
            return  # a layout we cannot measure without decoding: the stream check or the reader will tell
        expected = layout.compressed_size if layout.compressed else self.n_bytes
        available = layout.data_file.stat().st_size - layout.offset
        if available < expected:
            what = "compressed" if layout.compressed else _describe_bytes(self.size, 1, self.itemsize)
            raise VolumeError(self.path, "truncated", f"holds {max(available, 0)} bytes of pixel data{self._where()}; "
                                                      f"its header promises {expected} ({what})")

    def _verify_compressed_stream(self) -> None:
        """Decompress a zlib/gzip pixel stream once to check its checksum and length.

        ITK inflates such streams without reporting a checksum mismatch, so damaged data would
        otherwise be read as wrong voxel values. Memory stays bounded (16 MiB of output at a time).
        """
        layout = self.layout
        if layout is None or not layout.compressed:
            return
        decompressor = zlib.decompressobj(wbits=zlib.MAX_WBITS | 32)  # zlib or gzip header
        n_out = 0
        with open(layout.data_file, "rb") as handle:
            handle.seek(layout.offset)
            while not decompressor.eof:
                chunk = handle.read(1 << 20)
                if not chunk:
                    break
                try:
                    while chunk and not decompressor.eof:
                        n_out += len(decompressor.decompress(chunk, 1 << 24))
                        chunk = decompressor.unconsumed_tail
                except zlib.error as exc:
                    raise VolumeError(self.path, "unreadable", f"corrupt compressed pixel data{self._where()}: "
                                                               f"{_library_message(exc, self.path)}") from exc
        if not decompressor.eof or n_out < self.n_bytes:
            what = _describe_bytes(self.size, 1, self.itemsize)
            raise VolumeError(self.path, "truncated", f"compressed pixel data{self._where()} ends early: it "
                                                      f"decompresses to {n_out} bytes; its header promises "
                                                      f"{self.n_bytes} ({what})")


MODALITY_CODE = re.compile(r"^[A-Z]{2,3}$")
"""A DICOM modality code (CT, MR, PT, NM, US, ...), as the manifest schema allows."""
_METAIMAGE_MODALITIES = {"MET_MOD_CT": "CT", "MET_MOD_MR": "MR", "MET_MOD_NM": "NM", "MET_MOD_US": "US"}
"""MetaImage ``Modality`` values that name one (``MET_MOD_OTHER`` and ``MET_MOD_UNKNOWN``, which
ITK reports for every file without the field, do not)."""


def _header_modality(value: str) -> str | None:
    """The DICOM modality code a header field states: ``MET_MOD_CT`` or ``ct`` -> ``CT``; else None."""
    text = value.strip().upper()
    text = _METAIMAGE_MODALITIES.get(text, text)
    return text if MODALITY_CODE.match(text) else None


class _PixelLayout(NamedTuple):
    """Where a MetaImage/NRRD file keeps its pixel bytes."""

    data_file: Path
    offset: int
    """Byte offset of the first pixel byte in ``data_file``."""
    compressed: bool
    """A zlib (MetaImage) or gzip (NRRD) stream rather than raw bytes."""
    compressed_size: int | None
    """Length of the compressed stream when the header states it (MetaImage CompressedDataSize)."""


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(_HEADER_READ_LIMIT)


def _is_single_data_file(name: str) -> bool:
    return not ("%" in name or name.upper().startswith("LIST") or " " in name.strip())


def _metaimage_layout(path: Path) -> _PixelLayout | None:
    """Pixel layout of a MetaImage header; None for layouts not measured (multi-file, HeaderSize -1)."""
    fields, offset = {}, 0
    for line in _read_head(path).split(b"\n"):
        offset += len(line) + 1
        key, _, value = line.decode("latin-1").partition("=")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    else:
        return None
    data = fields["ElementDataFile"]
    if data.upper() == "LOCAL":
        data_file = path
    elif _is_single_data_file(data):
        data_file, offset = path.parent / data, 0
    else:
        return None
    try:
        header_size = int(fields.get("HeaderSize") or 0)
        compressed_size = int(fields["CompressedDataSize"]) if fields.get("CompressedDataSize") else None
    except ValueError:
        return None  # a malformed header: SimpleITK will name the problem
    if header_size < 0:
        return None
    compressed = fields.get("CompressedData", "False").lower() == "true"
    return _PixelLayout(data_file, offset + header_size, compressed, compressed_size if compressed else None)


def _nrrd_layout(path: Path) -> _PixelLayout | None:
    """Pixel layout of a raw or gzip NRRD header; None for others (ascii, bzip2, multi-file, skips)."""
    lines = _read_head(path).split(b"\n")
    if not lines[0].startswith(b"NRRD"):
        return None
    fields, offset, ended = {}, len(lines[0]) + 1, False
    for line in lines[1:]:
        offset += len(line) + 1
        text = line.decode("latin-1").rstrip("\r")
        if text == "":
            ended = True
            break
        if text.startswith("#") or ":=" in text:
            continue
        key, separator, value = text.partition(":")
        if separator:
            fields[key.strip().lower().replace(" ", "")] = value.strip()
    encoding = fields.get("encoding", "").lower()
    try:
        line_skip, byte_skip = int(fields.get("lineskip", "0")), int(fields.get("byteskip", "0"))
    except ValueError:
        return None
    if encoding not in ("raw", "gzip", "gz") or line_skip != 0 or byte_skip < 0:
        return None
    compressed = encoding != "raw"
    data = fields.get("datafile")
    if data is None:
        return _PixelLayout(path, offset + byte_skip, compressed, None) if ended else None
    return _PixelLayout(path.parent / data, byte_skip, compressed, None) if _is_single_data_file(data) else None


def source_files(image: Path) -> list[Path]:
    """The files whose content makes up one image path: every file under a DICOM series folder; a
    ``.mhd``/``.nhdr`` header and its detached data file; otherwise the file itself."""
    image = Path(image)
    if image.is_dir():
        return sorted(p for p in image.rglob("*") if p.is_file())
    files = [image]
    fmt = volume_format(image) if image.is_file() else None
    layout = _metaimage_layout(image) if fmt == "metaimage" else _nrrd_layout(image) if fmt == "nrrd" else None
    if layout is not None and layout.data_file != image:
        files.append(layout.data_file)
    return files


def _itk_message(exc: Exception, path: Path) -> str:
    """The informative part of an ITK/SimpleITK exception message, on one line (see :func:`_library_message`)."""
    text = str(exc)
    for marker in ("ITK ERROR:", "itk::ERROR:", "sitk::ERROR:"):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    text = re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", text)
    return _library_message(text, path)


_QUOTED = re.compile(r"b?\"[^\"]*\"|b'(?:[^'\\]|\\.)*'")
"""A double-quoted string, or a ``bytes`` literal (``b'...'``), inside a library's message."""
LIBRARY_MESSAGE_CHARS = 300
"""Longest library message quoted in an error."""


def _library_message(exc: BaseException | str, path: Path) -> str:
    """A library's error message on one line that quotes at most the file's name, never its content.

    Parsers quote what they could not parse (Teem's NRRD reader quotes the file's first line),
    and the file may be a link to anything (``scan.nrrd -> /etc/passwd``). So the file's path
    (as given, absolute, or the link's target) becomes its name, every other quoted string or
    bytes literal becomes ``"..."``, and the message is cut at :data:`LIBRARY_MESSAGE_CHARS`.
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    path = Path(path)
    for spelling in sorted({str(path), str(path.absolute()), os.path.realpath(path)}, key=len, reverse=True):
        text = text.replace(spelling, path.name)
    text = _QUOTED.sub(lambda m: m.group(0) if m.group(0).strip("b\"'") == path.name else '"..."', text)
    return text if len(text) <= LIBRARY_MESSAGE_CHARS else text[: LIBRARY_MESSAGE_CHARS - 3] + "..."


# ----------------------------------------------------------------------------- DICOM


def _dicom_series(path: Path, series_uid: str | None) -> DicomSeries:
    """The one problem-free series at ``path`` (a directory, searched recursively, or a file)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise VolumeError(path, "unreadable", "empty directory; expected DICOM files of one series")
    scan = scan_dicom(files)
    if series_uid is not None:
        matches = [s for s in scan.series if s.uid == series_uid]
        if not matches:
            available = "; ".join(s.summary() for s in scan.series) or "none"
            raise VolumeError(path, "unknown-series", f"no DICOM series with SeriesInstanceUID {series_uid}; "
                                                      f"series found: {available}")
        series = matches[0]
    elif not scan.series:
        raise _nothing_readable(path, scan)
    elif len(scan.series) > 1:
        listed = "; ".join(s.summary() for s in scan.series)
        raise VolumeError(path, "multiple-series", f"{len(scan.series)} DICOM series where one was expected; pass "
                                                   f"series_uid to choose one of: {listed}")
    else:
        series = scan.series[0]
    if series.problems:
        raise VolumeError(path, "dicom-series", series.problem_report())
    return series


def _nothing_readable(path: Path, scan: DicomScan) -> VolumeError:
    """The error for a DICOM path where every file was skipped: the commonest kind, with reasons."""
    if len(scan.skipped) == 1:
        only = scan.skipped[0]
        return VolumeError(path, only.kind, only.reason if only.path == path else f"{only.path.name}: {only.reason}")
    kinds = sorted({s.kind for s in scan.skipped}, key=lambda k: -sum(s.kind == k for s in scan.skipped))
    examples = []
    for kind in kinds:
        of_kind = [s for s in scan.skipped if s.kind == kind]
        examples.append(f"{len(of_kind)} {kind} (e.g. {of_kind[0].path.name}: {of_kind[0].reason})")
    return VolumeError(path, kinds[0], f"no DICOM volume: all {len(scan.skipped)} files were skipped: "
                                       + "; ".join(examples))
