"""scan_dicom / DicomSeries checks / load_dicom_series, on pydicom's real files and written series."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1

from volpre.data.dicom import load_dicom_series, scan_dicom, stack_affine
from volpre.demo.dicom_writer import SeriesTags, deterministic_uid, write_dicom_series, write_multiframe_dicom
from volpre.data.errors import VolumeError
from volpre.data.readers import read_header, read_volume

PYDICOM_DATA = Path(os.path.dirname(pydicom.data.get_testdata_file("CT_small.dcm")))
TREES = PYDICOM_DATA / "dicomdirtests"
AXIAL = np.array([[0.8, 0, 0, -10.0], [0, 0.8, 0, 20.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def write_ct(folder: Path, affine: np.ndarray = AXIAL, shape=(16, 16, 8), seed: int = 0, file_names=None,
             **tags) -> list[Path]:
    volume = np.random.default_rng(seed).integers(-1000, 1000, size=shape).astype(np.float32)
    tags = {"modality": "CT", "patient_id": "p1", **tags}
    return write_dicom_series(volume, affine, folder, SeriesTags(**tags, rescale_intercept=-1024.0), file_names)


def edit(path: Path, **attributes) -> None:
    ds = pydicom.dcmread(path)
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.save_as(path)


def assert_rejected(folder: Path, pattern: str) -> None:
    """The series in ``folder`` has a problem matching ``pattern``, and nothing reads it."""
    scan = scan_dicom(files_under(folder))
    assert len(scan.series) == 1
    series = scan.series[0]
    assert any(re.search(pattern, p) for p in series.problems), series.problems
    assert series.affine is None and series.shape is None and series.slice_spacing is None
    for read in (read_volume, read_header):
        with pytest.raises(VolumeError, match=rf"is not a regular volume: .*{pattern}") as info:
            read(folder)
        assert info.value.kind == "dicom-series" and info.value.path == str(folder)
    with pytest.raises(VolumeError, match=pattern):
        load_dicom_series(series)


# ----------------------------------------------------------------------------- real files


def test_real_tree_sorts_by_position_and_skips_localizers():
    scan = scan_dicom(files_under(TREES / "98892001"))
    assert len(scan.series) == 1
    series = scan.series[0]
    assert series.modality == "CT" and series.description == "SmartScore - Gated 0.5 sec"
    # z positions: 2062 at 8.76 mm ... 3353 at -1.24 mm; sorted along the normal (+z)
    assert [p.name for p in series.files] == ["3353", "3023", "2693", "2392", "2062"]
    assert series.shape == (16, 16, 5) and series.slice_spacing == pytest.approx(2.5)
    assert series.problems == []
    assert sorted(s.path.name for s in scan.skipped) == ["6293", "6924"]
    for skipped in scan.skipped:
        assert skipped.kind == "not-an-image"
        assert "localizer (scout) image (ImageType ORIGINAL\\PRIMARY\\LOCALIZER)" in skipped.reason
    volume = read_volume(TREES / "98892001")  # the localizers do not stop the CT series from being read
    np.testing.assert_allclose(volume.affine.numpy(), series.affine)


def test_real_tree_with_radiographs_and_a_gapped_ct():
    scan = scan_dicom(files_under(TREES / "77654033"))
    skipped = {s.path.parent.name: s for s in scan.skipped}
    assert set(skipped) == {"CR1", "CR2", "CR3"}
    for item in skipped.values():
        assert item.kind == "dimensionality"
        assert item.reason.startswith(
            "2D image without ImagePositionPatient, ImageOrientationPatient, PixelSpacing (Modality CR)"
        )
    # CT2 holds 4 slices at -99.48, 103.02, 104.27, 105.52 mm: a 202.5 mm gap
    assert_rejected(TREES / "77654033" / "CT2",
                    r"missing slices: 1 gap\(s\) wider than 1.5 x the median spacing 1.250 mm: 202.500 mm between "
                    r"-99.480 and 103.020 mm \(about 161 missing slice\(s\)\)")
    with pytest.raises(VolumeError, match=r"77654033: DICOM series .* is not a regular volume: missing slices"):
        read_volume(TREES / "77654033")


def test_real_mixed_orientations_and_several_series():
    assert_rejected(TREES / "98892003" / "MR700", r"mixed orientations \(ImageOrientationPatient\): 7 distinct values")
    with pytest.raises(VolumeError, match=r"98892003: 3 DICOM series where one was expected; pass series_uid to "
                                          r"choose one of: .*\(MR, 'T/S/C RF FAST PILOT', 3 slices\) \[rejected: "
                                          r"mixed orientations") as info:
        read_volume(TREES / "98892003")
    assert info.value.kind == "multiple-series"


def test_single_slice_is_not_a_volume():
    path = PYDICOM_DATA / "CT_small.dcm"
    for read in (read_volume, read_header):
        with pytest.raises(VolumeError, match=r"CT_small\.dcm: single-slice series .* \(CT, ''\): 1 image; expected at "
                                              r"least 2 slices to form a 3D volume") as info:
            read(path)
        assert info.value.kind == "dimensionality"


@pytest.mark.parametrize(
    "name,what",
    [("rtstruct.dcm", "RT Structure Set Storage"), ("test-SR.dcm", "Comprehensive SR Storage"),
     ("rtplan.dcm", "RT Plan Storage"), ("liver_1frame.dcm", "Segmentation Storage"),
     ("rtdose.dcm", "RT Dose Storage")],
)
def test_non_image_objects_are_skipped(tmp_path, name, what):
    scan = scan_dicom([PYDICOM_DATA / name])
    assert scan.series == [] and len(scan.skipped) == 1
    assert scan.skipped[0].kind == "not-an-image"
    assert f"holds a {what} object" in scan.skipped[0].reason
    with pytest.raises(VolumeError, match=rf"{name}: holds a {what} object \(Modality \w+\), not an image; expected "
                                          r"CT/MR slices") as info:
        read_volume(PYDICOM_DATA / name)
    assert info.value.kind == "not-an-image"
    paths = write_ct(tmp_path / "study")  # beside a CT series, they are ignored
    shutil.copy(PYDICOM_DATA / name, tmp_path / "study" / name)
    assert read_volume(tmp_path / "study").shape == (1, 16, 16, 8) and len(paths) == 8


def test_folder_of_nothing_readable_names_the_commonest_reason(tmp_path):
    for name in ("rtstruct.dcm", "rtplan.dcm", "CT_small.dcm"):
        shutil.copy(PYDICOM_DATA / name, tmp_path / name)
    with pytest.raises(VolumeError, match=r"no DICOM volume: all 3 files were skipped: 2 not-an-image \(e\.g\. "
                                          r"rtplan\.dcm: holds a RT Plan Storage object.*; 1 dimensionality") as info:
        read_volume(tmp_path)
    assert info.value.kind == "not-an-image"


# ----------------------------------------------------------------------------- synthetic series


def test_slices_sorted_by_position_not_name_or_instance_number(tmp_path):
    names = [f"IM{k:02d}.dcm" for k in reversed(range(8))]
    paths = write_ct(tmp_path, file_names=names)
    for path, number in zip(paths, [5, 2, 7, 1, 8, 3, 6, 4]):
        edit(path, InstanceNumber=number)
    scan = scan_dicom(files_under(tmp_path))
    assert scan.series[0].files == paths  # path k holds slice k (z grows with k)
    assert [s.position[2] for s in scan.series[0].slices] == sorted(s.position[2] for s in scan.series[0].slices)


def test_stack_geometry_of_a_series(tmp_path):
    write_ct(tmp_path, affine=AXIAL, shape=(16, 12, 6))
    series = scan_dicom(files_under(tmp_path)).series[0]
    assert (series.rows, series.cols) == (12, 16)
    assert series.pixel_spacing == pytest.approx((0.8, 0.8)) and series.slice_spacing == pytest.approx(2.0)
    assert series.orientation == pytest.approx((-1, 0, 0, 0, -1, 0))  # +x RAS is -x LPS
    assert series.origin_lps == pytest.approx((10.0, -20.0, -30.0))
    np.testing.assert_allclose(stack_affine(series), AXIAL, atol=1e-9)
    volume, affine = load_dicom_series(series)
    assert volume.dtype == np.float32 and volume.shape == (16, 12, 6)
    np.testing.assert_allclose(affine, AXIAL, atol=1e-9)


def test_small_position_jitter_is_tolerated(tmp_path):
    paths = write_ct(tmp_path)
    ds = pydicom.dcmread(paths[3])
    ds.ImagePositionPatient = [float(v) + 1e-4 for v in ds.ImagePositionPatient]
    ds.save_as(paths[3])
    assert scan_dicom(paths).series[0].problems == []
    assert read_volume(tmp_path).shape == (1, 16, 16, 8)


def test_gantry_tilt(tmp_path):
    tilted = AXIAL.copy()
    tilted[1, 2] = 2.0 * np.tan(np.radians(15.0))  # each slice moves 0.536 mm posterior-anterior
    write_ct(tmp_path, affine=tilted)
    assert_rejected(tmp_path, r"gantry tilt: slice positions drift 3\.751 mm sideways from the slice normal "
                              r"\(0007\.dcm\), a tilt of 15\.00 degrees")


def test_missing_slice(tmp_path):
    paths = write_ct(tmp_path)
    paths[4].unlink()
    assert_rejected(tmp_path, r"missing slices: 1 gap\(s\) wider than 1.5 x the median spacing 2\.000 mm: 4\.000 mm "
                              r"between -24\.000 and -20\.000 mm \(about 1 missing slice\(s\)\)")


def test_duplicate_position(tmp_path):
    paths = write_ct(tmp_path)
    ds = pydicom.dcmread(paths[2])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = deterministic_uid("copy")
    ds.save_as(tmp_path / "copy.dcm")
    assert_rejected(tmp_path, r"duplicate slice positions: 1 pair\(s\) of slices share a position along the normal: "
                              r"0002\.dcm and copy\.dcm at -26\.000 mm")


def test_non_uniform_spacing(tmp_path):
    paths = write_ct(tmp_path)
    ds = pydicom.dcmread(paths[3])
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], -23.5]  # 0.5 mm off
    ds.save_as(paths[3])
    assert_rejected(tmp_path, r"non-uniform slice spacing: gaps range from 1\.5000 to 2\.5000 mm, and 0003\.dcm lies "
                              r"0\.5000 mm \(0\.25 of a spacing\) from the evenly spaced stack")


def test_mixed_orientation(tmp_path):
    paths = write_ct(tmp_path)
    edit(paths[5], ImageOrientationPatient=[1, 0, 0, 0, 0.9950042, -0.0998334])
    assert_rejected(tmp_path, r"mixed orientations \(ImageOrientationPatient\): 2 distinct values: "
                              r"\[-1\.0, 0\.0, 0\.0, 0\.0, -1\.0, 0\.0\] in 7 slice\(s\), .* in 1 slice\(s\); "
                              r"expected one")


def test_mixed_pixel_spacing(tmp_path):
    paths = write_ct(tmp_path)
    edit(paths[0], PixelSpacing=[0.9, 0.9])
    assert_rejected(tmp_path, r"mixed pixel spacings: 2 distinct values: \[0\.8, 0\.8\] mm in 7 slice\(s\), "
                              r"\[0\.9, 0\.9\] mm in 1 slice\(s\); expected one")


def test_mixed_image_size(tmp_path):
    paths = write_ct(tmp_path / "a", shape=(16, 16, 4))
    series_uid = pydicom.dcmread(paths[0]).SeriesInstanceUID
    shifted = AXIAL.copy()
    shifted[2, 3] += 8.0  # continue the stack above the first four slices
    write_ct(tmp_path / "b", affine=shifted, shape=(16, 20, 4), series_uid=series_uid, file_names=[
        f"b{k}.dcm" for k in range(4)])
    assert_rejected(tmp_path, r"mixed image sizes \(rows x columns\): 16x16 in 4 slice\(s\), 20x16 in 4 slice\(s\); "
                              r"expected one size")


def test_every_problem_is_listed(tmp_path):
    tilted = AXIAL.copy()
    tilted[0, 2] = 1.0
    paths = write_ct(tmp_path, affine=tilted)
    paths[5].unlink()
    edit(paths[1], PixelSpacing=[0.7, 0.8])
    series = scan_dicom(files_under(tmp_path)).series[0]
    assert [p.split(":")[0] for p in series.problems] == ["mixed pixel spacings", "missing slices", "gantry tilt"]
    with pytest.raises(VolumeError, match=r"mixed pixel spacings.*; missing slices.*; gantry tilt"):
        read_volume(tmp_path)


def test_enhanced_frames_pass_the_same_checks(tmp_path):
    volume = np.random.default_rng(0).integers(-1000, 1000, size=(16, 16, 6)).astype(np.float32)
    path = write_multiframe_dicom(volume, AXIAL, tmp_path / "enhanced.dcm", SeriesTags("CT", "p"))
    series = scan_dicom([path]).series[0]
    assert series.files == [path] and [s.frame for s in series.slices] == list(range(6))
    ds = pydicom.dcmread(path)
    ds.PerFrameFunctionalGroupsSequence[4].PlanePositionSequence[0].ImagePositionPatient = (
        ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0].ImagePositionPatient
    )
    ds.save_as(path)
    with pytest.raises(VolumeError, match=r"duplicate slice positions: .*enhanced\.dcm frame 1 and enhanced\.dcm "
                                          r"frame 4 at -28\.000 mm.*missing slices") as info:
        read_volume(path)
    assert info.value.kind == "dicom-series"


def test_several_series_need_a_series_uid(tmp_path):
    ct = write_ct(tmp_path / "ct", series_description="chest", series_number=1)
    mr = write_ct(tmp_path / "mr", modality="MR", series_description="t1", series_number=2, shape=(16, 16, 5))
    ct_uid, mr_uid = (pydicom.dcmread(p[0]).SeriesInstanceUID for p in (ct, mr))
    listing = rf"{ct_uid} \(CT, 'chest', 8 slices\); {mr_uid} \(MR, 't1', 5 slices\)"
    with pytest.raises(VolumeError, match=rf"2 DICOM series where one was expected; pass series_uid to choose one "
                                          rf"of: {listing}") as info:
        read_volume(tmp_path)
    assert info.value.kind == "multiple-series"
    assert read_volume(tmp_path, series_uid=mr_uid).meta["series_uid"] == mr_uid
    assert read_volume(tmp_path, series_uid=ct_uid).shape == (1, 16, 16, 8)
    assert read_header(tmp_path, series_uid=mr_uid).shape == (16, 16, 5)
    with pytest.raises(VolumeError, match=rf"no DICOM series with SeriesInstanceUID 1\.2\.3; series found: "
                                          rf"{ct_uid} \(CT, 'chest', 8 slices\); {mr_uid}") as info:
        read_volume(tmp_path, series_uid="1.2.3")
    assert info.value.kind == "unknown-series"


def test_synthetic_localizer_series_is_skipped(tmp_path):
    for path in write_ct(tmp_path):
        edit(path, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    scan = scan_dicom(files_under(tmp_path))
    assert scan.series == [] and {s.kind for s in scan.skipped} == {"not-an-image"}
    with pytest.raises(VolumeError, match=r"all 8 files were skipped: 8 not-an-image \(e\.g\. 0000\.dcm: a localizer"):
        read_volume(tmp_path)


def test_colour_and_non_dicom_files_are_skipped(tmp_path):
    paths = write_ct(tmp_path)
    (tmp_path / "notes.txt").write_text("scanner notes")
    (tmp_path / "broken.dcm").write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    shutil.copy(pydicom.data.get_testdata_file("SC_rgb_small_odd.dcm"), tmp_path / "colour.dcm")
    scan = scan_dicom(files_under(tmp_path))
    assert len(scan.series) == 1 and scan.series[0].files == paths
    reasons = {s.path.name: (s.kind, s.reason) for s in scan.skipped}
    assert reasons["notes.txt"] == ("unreadable", "not a DICOM file (no 'DICM' marker at byte 128)")
    assert reasons["broken.dcm"][0] == "unreadable"
    assert reasons["colour.dcm"][0] == "non-scalar"
    assert reasons["colour.dcm"][1].startswith("colour image (3 samples per pixel, RGB)")


def test_truncated_slice(tmp_path):
    paths = write_ct(tmp_path)
    blob = paths[6].read_bytes()
    paths[6].write_bytes(blob[:-100])
    with pytest.raises(VolumeError, match=r"0006\.dcm: holds 412 bytes of pixel data; its header promises 512 "
                                          r"\(16x16 pixels x 1 frames x 16 bits\)") as info:
        read_volume(tmp_path)
    assert info.value.kind == "truncated" and info.value.path == str(tmp_path)


def test_undecodable_pixel_data(tmp_path):
    paths = write_ct(tmp_path)
    ds = pydicom.dcmread(paths[2])
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8 not really a JPEG stream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(paths[2], enforce_file_format=True)
    with pytest.raises(VolumeError, match=r"0002\.dcm: cannot decode pixel data \(JPEG Lossless, Non-Hierarchical, "
                                          r"First-Order Prediction.*\): .*decoder plugin") as info:
        read_volume(tmp_path)
    assert info.value.kind == "unreadable"


def test_progress_counts_files(tmp_path):
    paths = write_ct(tmp_path)
    seen = []
    scan_dicom(paths + [tmp_path / "absent.txt"], progress=seen.append)
    assert seen == list(range(1, 10))


def test_frame_is_refused_for_dicom(tmp_path):
    write_ct(tmp_path)
    with pytest.raises(VolumeError, match=r"frame=0 given, but DICOM series are 3D") as info:
        read_volume(tmp_path, frame=0)
    assert info.value.kind == "bad-frame"


# ----------------------------------------------------------------------------- compressed pixel data


def _series_from_one_file(source: str, folder, n: int = 3):
    """``n`` slices stacked along the normal from one real file (headers edited, pixels untouched)."""
    folder.mkdir()
    ds = pydicom.dcmread(pydicom.data.get_testdata_file(source))
    position = [float(v) for v in ds.ImagePositionPatient]
    for k in range(n):
        ds.ImagePositionPatient = [position[0], position[1], position[2] + 5.0 * k]
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[source, str(k)])
        ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[source])
        ds.InstanceNumber = k + 1
        ds.save_as(folder / f"{k}.dcm")
    return folder


@pytest.mark.parametrize("compressed", ["MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"])
def test_compressed_series_decode_like_the_uncompressed_original(tmp_path, compressed):
    """JPEG 2000 lossless (pylibjpeg-openjpeg) and RLE decode to the original's voxels."""
    from volpre.data.readers import read_volume

    plain = read_volume(_series_from_one_file("MR_small.dcm", tmp_path / "plain"))
    packed = read_volume(_series_from_one_file(compressed, tmp_path / "packed"))
    assert packed.shape == plain.shape == (1, 64, 64, 3)
    assert torch.equal(packed, plain)
    assert np.allclose(packed.affine, plain.affine)
