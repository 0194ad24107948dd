"""Write a 3D volume as DICOM: a classic series (one file per slice) or one Enhanced multi-frame file.

Used by the tests and by the synthetic demo data. The input is a volume ``(X, Y, Z)`` in voxel
axes and its ``affine`` (4x4, voxel index -> world RAS millimetres), exactly what
:func:`volpre.data.readers.read_volume` returns; any orientation works, oblique included.

Voxel axis ``X`` runs along a DICOM row (the column index), ``Y`` along a DICOM column (the
row index) and ``Z`` across slices, so slice ``k`` stores ``volume[:, :, k].T`` as its
``(Rows, Columns)`` pixel array and sits at ``ImagePositionPatient = origin + k * step``, with
``origin`` and ``step`` the LPS forms of the affine's fourth and third columns. The first two
affine columns must be orthogonal (DICOM pixel grids are rectangular); the third need not be
orthogonal to them: a slanted third column gives a gantry-tilted series, which readers that
assume orthogonal stacks (SimpleITK among them) cannot place correctly.

Pixels are stored as ``stored = round((value - rescale_intercept) / rescale_slope)``: ``int16``
for CT (``value`` in HU), ``uint16`` for MR when every stored value is >= 0, else ``int16``.
Files are Explicit VR Little Endian with a full file meta header; every UID is derived from
the arguments with :func:`deterministic_uid`, so the same call writes the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from volpre.data.geometry import LPS_TO_RAS

_SOP_CLASSES = {
    ("CT", False): CTImageStorage,
    ("MR", False): MRImageStorage,
    ("CT", True): EnhancedCTImageStorage,
    ("MR", True): EnhancedMRImageStorage,
}
_ORTHOGONALITY_TOLERANCE = 1e-6


def deterministic_uid(seed: str) -> str:
    """A valid DICOM UID (pydicom's root prefix) that depends only on ``seed``."""
    return generate_uid(entropy_srcs=[seed])


@dataclass(frozen=True)
class SeriesTags:
    """What both writers take besides the voxels and their grid: the patient, study and series the
    files belong to, and how their values are stored.

    Attributes:
        modality: ``"CT"`` or ``"MR"``.
        patient_id: PatientID and PatientName.
        study_uid, series_uid: default to UIDs derived from ``patient_id`` (and the series number
            and description).
        series_description, series_number: SeriesDescription, SeriesNumber.
        rescale_slope, rescale_intercept: RescaleSlope/RescaleIntercept of the stored values.
    """

    modality: str
    patient_id: str
    study_uid: str | None = None
    series_uid: str | None = None
    series_description: str = ""
    series_number: int = 1
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0


def write_dicom_series(volume: np.ndarray, affine: np.ndarray, out_dir: Path, tags: SeriesTags,
                       file_names: Sequence[str] | None = None) -> list[Path]:
    """Write ``volume`` ``(X, Y, Z)`` as ``Z`` single-frame CT/MR Image Storage files in ``out_dir``.

    Args:
        volume: ``(X, Y, Z)`` real values (HU for CT); stored as described in the module docstring.
        affine: ``(4, 4)`` voxel index -> world RAS mm.
        out_dir: created if missing.
        tags: the series; its rescale is written in every file.
        file_names: one name per slice (slice ``k`` gets ``file_names[k]`` and InstanceNumber
            ``k + 1``); default ``0000.dcm``, ``0001.dcm``, ...

    Returns:
        The written paths, slice ``k`` at index ``k``.
    """
    volume = np.asarray(volume)
    n_slices = _check_volume(volume)
    if file_names is None:
        width = max(4, len(str(n_slices - 1)))
        file_names = [f"{k:0{width}d}.dcm" for k in range(n_slices)]
    if len(file_names) != n_slices or len(set(file_names)) != n_slices:
        raise ValueError(f"file_names must hold {n_slices} distinct names (one per slice), got {list(file_names)}")
    base, geometry, stored = _start(volume, affine, tags, enhanced=False)
    modality, series_uid = tags.modality, base.SeriesInstanceUID
    base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    base.ImageOrientationPatient = geometry.orientation
    base.PixelSpacing = geometry.pixel_spacing
    base.SliceThickness = geometry.slice_thickness
    base.SpacingBetweenSlices = geometry.slice_thickness
    base.RescaleSlope = _ds(tags.rescale_slope)
    base.RescaleIntercept = _ds(tags.rescale_intercept)
    base.RescaleType = "HU" if modality == "CT" else "US"
    if modality == "CT":
        base.KVP = None
        base.AcquisitionNumber = None
    else:
        base.ScanningSequence = "RM"
        base.SequenceVariant = "NONE"
        base.ScanOptions = None
        base.MRAcquisitionType = "3D"
        base.EchoTime = None
        base.EchoTrainLength = None

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    ds = base  # one dataset, re-stamped: every element that differs between slices is set below
    for k in range(n_slices):
        sop_instance_uid = deterministic_uid(f"{series_uid}/{k}")
        ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
        ds.SOPInstanceUID = sop_instance_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = geometry.position(k)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = out_dir / file_names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_multiframe_dicom(volume: np.ndarray, affine: np.ndarray, path: Path, tags: SeriesTags) -> Path:
    """Write ``volume`` ``(X, Y, Z)`` as one Enhanced CT/MR Image Storage file of ``Z`` frames.

    Geometry and rescale live in the functional groups: PixelMeasuresSequence,
    PlaneOrientationSequence and PixelValueTransformationSequence are shared, PlanePositionSequence
    and FrameContentSequence are per frame (frame ``k`` is slice ``k``). Arguments as for
    :func:`write_dicom_series`. Returns ``path``.

    Long because an Enhanced multi-frame object is built attribute by attribute in the order of the
    DICOM modules (shared and per-frame functional groups); each block is a few assignments.
    """
    volume = np.asarray(volume)
    n_frames = _check_volume(volume)
    ds, geometry, stored = _start(volume, affine, tags, enhanced=True)
    modality, series_uid = tags.modality, ds.SeriesInstanceUID
    sop_instance_uid = deterministic_uid(f"{series_uid}/multiframe")
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.ContentDate = "20000101"
    ds.ContentTime = "000000"
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.BurnedInAnnotation = "NO"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.NumberOfFrames = n_frames

    measures = Dataset()
    measures.PixelSpacing = geometry.pixel_spacing
    measures.SliceThickness = geometry.slice_thickness
    measures.SpacingBetweenSlices = geometry.slice_thickness
    plane_orientation = Dataset()
    plane_orientation.ImageOrientationPatient = geometry.orientation
    value_transformation = Dataset()
    value_transformation.RescaleSlope = _ds(tags.rescale_slope)
    value_transformation.RescaleIntercept = _ds(tags.rescale_intercept)
    value_transformation.RescaleType = "HU" if modality == "CT" else "US"
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([plane_orientation])
    shared.PixelValueTransformationSequence = DicomSequence([value_transformation])
    if modality == "CT":
        shared.CTImageFrameTypeSequence = DicomSequence([frame_type])
    else:
        shared.MRImageFrameTypeSequence = DicomSequence([frame_type])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    dimension_organization_uid = deterministic_uid(f"{series_uid}/dimensions")
    organization = Dataset()
    organization.DimensionOrganizationUID = dimension_organization_uid
    ds.DimensionOrganizationSequence = DicomSequence([organization])
    frame_content_tag = pydicom.datadict.tag_for_keyword("FrameContentSequence")
    indices = []
    for keyword in ("StackID", "InStackPositionNumber"):
        index = Dataset()
        index.DimensionOrganizationUID = dimension_organization_uid
        index.DimensionIndexPointer = pydicom.datadict.tag_for_keyword(keyword)
        index.FunctionalGroupPointer = frame_content_tag
        indices.append(index)
    ds.DimensionIndexSequence = DicomSequence(indices)

    per_frame = []
    for k in range(n_frames):
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.DimensionIndexValues = [1, k + 1]
        position = Dataset()
        position.ImagePositionPatient = geometry.position(k)
        group = Dataset()
        group.FrameContentSequence = DicomSequence([content])
        group.PlanePositionSequence = DicomSequence([position])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.ascontiguousarray(np.transpose(stored, (2, 1, 0))).tobytes()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


class _PlaneGeometry:
    """DICOM plane attributes (LPS) of the slices of a voxel grid given by a RAS affine."""

    def __init__(self, origin: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray, step: np.ndarray,
                 column_spacing: float, row_spacing: float, slice_thickness: float):
        self._origin, self._step = origin, step
        self.orientation = [_ds(v) for v in (*row_dir, *col_dir)]
        self.pixel_spacing = [_ds(row_spacing), _ds(column_spacing)]
        self.slice_thickness = _ds(slice_thickness)

    @classmethod
    def from_affine(cls, affine: np.ndarray) -> _PlaneGeometry:
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
        lps = LPS_TO_RAS @ affine
        column_spacing = float(np.linalg.norm(lps[:3, 0]))  # mm between neighbouring columns (along X)
        row_spacing = float(np.linalg.norm(lps[:3, 1]))  # mm between neighbouring rows (along Y)
        if column_spacing == 0 or row_spacing == 0:
            raise ValueError(f"affine has a zero-length in-plane axis: {affine.round(4).tolist()}")
        row_dir, col_dir = lps[:3, 0] / column_spacing, lps[:3, 1] / row_spacing
        if abs(float(row_dir @ col_dir)) > _ORTHOGONALITY_TOLERANCE:
            raise ValueError(
                f"affine's first two columns must be orthogonal (DICOM pixel grids are rectangular), "
                f"their direction cosines have dot product {float(row_dir @ col_dir):.3g}"
            )
        slice_thickness = abs(float(lps[:3, 2] @ np.cross(row_dir, col_dir)))
        if slice_thickness == 0:
            raise ValueError(f"affine's third column lies in the slice plane: {affine.round(4).tolist()}")
        return cls(lps[:3, 3], row_dir, col_dir, lps[:3, 2], column_spacing, row_spacing, slice_thickness)

    def position(self, k: int) -> list[DSfloat]:
        """ImagePositionPatient of slice ``k`` (LPS mm)."""
        return [_ds(v) for v in self._origin + k * self._step]


def _ds(value: float) -> DSfloat:
    return DSfloat(float(value), auto_format=True)


def _check_volume(volume: np.ndarray) -> int:
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise ValueError(f"volume must be a 3D array (X, Y, Z), got shape {volume.shape}")
    if not np.all(np.isfinite(volume)):
        raise ValueError("volume holds NaN or infinite values; DICOM stores integers")
    return volume.shape[2]


def _stored_values(volume: np.ndarray, modality: str, slope: float, intercept: float) -> tuple[np.ndarray, int]:
    """Stored integers and PixelRepresentation (0 unsigned, 1 signed) for ``volume``."""
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    if slope == 0:
        raise ValueError("rescale_slope must be non-zero")
    stored = np.rint((volume.astype(np.float64) - intercept) / slope)
    if modality == "MR" and stored.min() >= 0:
        dtype, pixel_representation = np.dtype("<u2"), 0
    else:
        dtype, pixel_representation = np.dtype("<i2"), 1
    info = np.iinfo(dtype)
    if stored.min() < info.min or stored.max() > info.max:
        raise ValueError(
            f"{modality} values {volume.min()}..{volume.max()} with rescale slope {slope} and intercept "
            f"{intercept} need stored values {stored.min():.0f}..{stored.max():.0f}, outside {dtype.name} "
            f"[{info.min}, {info.max}]; choose another rescale"
        )
    return stored.astype(dtype), pixel_representation


def _start(volume: np.ndarray, affine: np.ndarray, tags: SeriesTags,
           enhanced: bool) -> tuple[Dataset, _PlaneGeometry, np.ndarray]:
    """What both writers begin with: the dataset of the modules they share, the slices' plane
    geometry and the stored values of the (checked) ``volume``."""
    geometry = _PlaneGeometry.from_affine(affine)
    stored, pixel_representation = _stored_values(volume, tags.modality, tags.rescale_slope, tags.rescale_intercept)
    return _common_dataset(tags, enhanced, volume.shape, pixel_representation), geometry, stored


def _common_dataset(tags: SeriesTags, enhanced: bool, shape: tuple[int, ...], pixel_representation: int) -> Dataset:
    """Patient, study, series, frame of reference, equipment and image pixel modules."""
    modality, patient_id = tags.modality, tags.patient_id
    series_number, series_description = tags.series_number, tags.series_description
    study_uid = tags.study_uid or deterministic_uid(f"{patient_id}/study")
    series_uid = tags.series_uid or deterministic_uid(f"{study_uid}/series/{series_number}/{series_description}")
    sop_class_uid = _SOP_CLASSES.get((modality, enhanced))
    if sop_class_uid is None:
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "volpre"
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = None
    ds.PatientSex = None
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = None
    ds.StudyTime = None
    ds.ReferringPhysicianName = None
    ds.StudyID = None
    ds.AccessionNumber = None
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.FrameOfReferenceUID = deterministic_uid(f"{study_uid}/frame-of-reference")
    ds.PositionReferenceIndicator = None
    ds.Manufacturer = "volpre"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = shape[1]
    ds.Columns = shape[0]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = pixel_representation
    return ds
