"""Data layer: checked volume reading (NIfTI, NRRD, MetaImage, DICOM), manifests, presets.

The names below are the stable entry points; submodules hold the details.

Imports: only the bottom of volpre (errors, files, text, progress, config); no model, objective,
engine or export code, and not :mod:`volpre.demo` (demo data are not the data layer).
"""

from volpre.data.dicom import DicomScan, DicomSeries, SkippedFile, load_dicom_series, scan_dicom
from volpre.data.errors import ERROR_KINDS, VolumeError
from volpre.data.manifest import Manifest, ManifestEntry, ManifestError, load_manifest, save_manifest
from volpre.data.readers import VolumeHeader, read_header, read_volume, volume_format

__all__ = [
    "DicomScan",
    "DicomSeries",
    "ERROR_KINDS",
    "Manifest",
    "ManifestEntry",
    "ManifestError",
    "SkippedFile",
    "VolumeError",
    "VolumeHeader",
    "load_dicom_series",
    "load_manifest",
    "read_header",
    "read_volume",
    "save_manifest",
    "scan_dicom",
    "volume_format",
]
