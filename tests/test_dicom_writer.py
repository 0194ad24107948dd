"""write_dicom_series / write_multiframe_dicom: valid, deterministic files with the requested geometry.

That GDCM (SimpleITK) reads them back with the same geometry for every orientation is checked
in test_readers.py; here: the attributes themselves, storage types, determinism and errors.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import UID

from volpre.demo.dicom_writer import SeriesTags, deterministic_uid, write_dicom_series, write_multiframe_dicom

AFFINE = np.array([[0.0, 0.0, 2.5, 5.0], [-0.7, 0.0, 0.0, 6.0], [0.0, -0.9, 0.0, 7.0], [0, 0, 0, 1]])


def volume(low: float = -1000, high: float = 1000, shape=(5, 4, 3)) -> np.ndarray:
    return np.random.default_rng(0).integers(low, high, size=shape).astype(np.float64)


def test_series_attributes(tmp_path):
    data = volume()
    tags = SeriesTags("CT", "p7", series_description="axial", series_number=3, rescale_slope=2.0,
                      rescale_intercept=-1000.0)
    paths = write_dicom_series(data, AFFINE, tmp_path, tags)
    assert [p.name for p in paths] == ["0000.dcm", "0001.dcm", "0002.dcm"]
    datasets = [pydicom.dcmread(p) for p in paths]  # no force: preamble, DICM and file meta are there
    first = datasets[0]
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == pydicom.uid.CTImageStorage == first.file_meta.MediaStorageSOPClassUID
    assert (first.Rows, first.Columns) == (4, 5) and first.PixelRepresentation == 1
    # voxel x -> world -A (LPS +P... ) : RAS column (0,-0.7,0) is LPS (0, 0.7, 0)
    assert [float(v) for v in first.ImageOrientationPatient] == pytest.approx([0, 1, 0, 0, 0, -1])
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([0.9, 0.7])
    assert float(first.SliceThickness) == float(first.SpacingBetweenSlices) == pytest.approx(2.5)
    for k, ds in enumerate(datasets):
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx([-5.0 - 2.5 * k, -6.0, 7.0])
        assert ds.InstanceNumber == k + 1
        np.testing.assert_array_equal(ds.pixel_array * 2.0 - 1000.0, np.rint((data[:, :, k].T + 1000) / 2) * 2 - 1000)
    uids = {ds.SOPInstanceUID for ds in datasets}
    assert len(uids) == 3 and all(UID(u).is_valid for u in uids)
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1 and UID(first.StudyInstanceUID).is_valid
    assert first.SeriesDescription == "axial" and first.SeriesNumber == 3 and first.PatientID == "p7"


def test_writing_is_deterministic(tmp_path):
    first = write_dicom_series(volume(), AFFINE, tmp_path / "a", SeriesTags("MR", "p"))
    second = write_dicom_series(volume(), AFFINE, tmp_path / "b", SeriesTags("MR", "p"))
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert deterministic_uid("x") == deterministic_uid("x") != deterministic_uid("y")
    mf1 = write_multiframe_dicom(volume(), AFFINE, tmp_path / "1.dcm", SeriesTags("CT", "p"))
    mf2 = write_multiframe_dicom(volume(), AFFINE, tmp_path / "2.dcm", SeriesTags("CT", "p"))
    assert mf1.read_bytes() == mf2.read_bytes()


def test_mr_storage_types(tmp_path):
    unsigned = write_dicom_series(volume(0, 4000), AFFINE, tmp_path / "u", SeriesTags("MR", "p"))
    signed = write_dicom_series(volume(-10, 10), AFFINE, tmp_path / "s", SeriesTags("MR", "p"))
    assert pydicom.dcmread(unsigned[0]).PixelRepresentation == 0
    assert pydicom.dcmread(signed[0]).PixelRepresentation == 1
    assert pydicom.dcmread(unsigned[0]).SOPClassUID == pydicom.uid.MRImageStorage


def test_multiframe_attributes(tmp_path):
    path = write_multiframe_dicom(volume(), AFFINE, tmp_path / "mf.dcm", SeriesTags("MR", "p", rescale_slope=0.5))
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == pydicom.uid.EnhancedMRImageStorage and ds.NumberOfFrames == 3
    assert ds.pixel_array.shape == (3, 4, 5)
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert float(shared.PixelValueTransformationSequence[0].RescaleSlope) == 0.5
    positions = [[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
                 for f in ds.PerFrameFunctionalGroupsSequence]
    np.testing.assert_allclose(positions, [[-5.0 - 2.5 * k, -6.0, 7.0] for k in range(3)])


def test_gdcm_reads_the_series(tmp_path):
    write_dicom_series(volume(), AFFINE, tmp_path, SeriesTags("CT", "p"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    image = reader.Execute()
    assert image.GetSize() == (5, 4, 3)
    assert image.GetSpacing() == pytest.approx((0.7, 0.9, 2.5))


def test_writer_errors(tmp_path):
    with pytest.raises(ValueError, match=r"CT values -995.0..994.0 with rescale slope 0.01 and intercept 0.0 need "
                                         r"stored values -99500..99400, outside int16 \[-32768, 32767\]; choose "
                                         r"another rescale"):
        write_dicom_series(volume(), AFFINE, tmp_path, SeriesTags("CT", "p", rescale_slope=0.01))
    sheared = AFFINE.copy()
    sheared[:3, 1] = [0.0, 0.5, -0.9]
    with pytest.raises(ValueError, match=r"affine's first two columns must be orthogonal"):
        write_dicom_series(volume(), sheared, tmp_path, SeriesTags("CT", "p"))
    with pytest.raises(ValueError, match=r"file_names must hold 3 distinct names \(one per slice\), got \['a', 'b'\]"):
        write_dicom_series(volume(), AFFINE, tmp_path, SeriesTags("CT", "p"), file_names=["a", "b"])
    with pytest.raises(ValueError, match=r"modality must be 'CT' or 'MR', got 'PT'"):
        write_multiframe_dicom(volume(), AFFINE, tmp_path / "x.dcm", SeriesTags("PT", "p"))
    with pytest.raises(ValueError, match=r"volume must be a 3D array \(X, Y, Z\), got shape \(5, 4\)"):
        write_dicom_series(np.zeros((5, 4)), AFFINE, tmp_path, SeriesTags("CT", "p"))
