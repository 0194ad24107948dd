"""read_volume / read_header / volume_format: geometry and values against SimpleITK, every error.

Each geometry test maps every voxel of our volume to the world (our affine), then to the
reference's voxel grid (SimpleITK's origin/spacing/direction in LPS, or the array and RAS
affine the file was written from): the reference index must be integral and hold the same value.
"""

from __future__ import annotations

import os
import pickle
import shutil
import zlib

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation
from nibabel.eulerangles import euler2mat

from volpre.data import dicom as dicom_module
from volpre.demo.dicom_writer import SeriesTags, write_dicom_series, write_multiframe_dicom
from volpre.data.errors import ERROR_KINDS, VolumeError
from volpre.data.readers import read_header, read_volume, volume_format

PYDICOM_DATA = os.path.dirname(pydicom.data.get_testdata_file("CT_small.dcm"))
NIBABEL_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
LPS = np.array([-1.0, -1.0, 1.0])
SHAPE = (17, 19, 23)

AFFINES = {
    "ras": np.array([[0.8, 0, 0, -10.0], [0, 1.1, 0, 20.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]]),
    "flipped": np.array([[-0.8, 0, 0, 10.0], [0, 1.1, 0, -20.0], [0, 0, -2.0, 30.0], [0, 0, 0, 1]]),
    "permuted": np.array([[0, -1.1, 0, 5.0], [0, 0, 2.0, -7.0], [0.8, 0, 0, 12.0], [0, 0, 0, 1]]),
    "oblique": np.vstack(
        [np.hstack([euler2mat(0.6, -0.25, 0.45) @ np.diag([0.8, 1.1, 2.0]), [[3.0], [-4.0], [50.0]]]), [0, 0, 0, 1]]
    ),
}


# ----------------------------------------------------------------------------- helpers


def synthetic_volume(seed: int = 0, shape=SHAPE) -> np.ndarray:
    """Integer HU-like values (exact in float32 and int16) with no symmetry, ``(X, Y, Z)``."""
    return np.random.default_rng(seed).integers(-1000, 3000, size=shape).astype(np.float32)


def voxel_world_ras(volume: MetaTensor) -> np.ndarray:
    """RAS mm of every voxel of ``volume`` (C order), from its affine."""
    affine = volume.affine.numpy()
    index = np.indices(volume.shape[1:]).reshape(3, -1).T
    return index @ affine[:3, :3].T + affine[:3, 3]


def assert_matches_simpleitk(volume: MetaTensor, image: sitk.Image) -> None:
    """Every voxel of ``volume`` sits on a voxel of the 3D SimpleITK ``image`` and holds its value."""
    assert volume.shape[0] == 1 and volume.dtype == torch.float32
    assert volume.affine.dtype == torch.float64 and volume.affine.shape == (4, 4)
    lps = voxel_world_ras(volume) * LPS
    direction = np.array(image.GetDirection()).reshape(3, 3)
    index_to_world = direction * np.array(image.GetSpacing())
    continuous = np.linalg.solve(index_to_world, (lps - np.array(image.GetOrigin())).T).T
    index = np.rint(continuous)
    assert np.abs(continuous - index).max() < 1e-3
    index = index.astype(int)
    size = np.array(image.GetSize())
    assert (index >= 0).all() and (index < size).all() and np.prod(size) == volume[0].numel()
    assert len(np.unique(index, axis=0)) == len(index)
    reference = sitk.GetArrayViewFromImage(image)[index[:, 2], index[:, 1], index[:, 0]]
    np.testing.assert_allclose(volume[0].numpy().reshape(-1), reference, rtol=0, atol=1e-3)


def assert_matches_array(volume: MetaTensor, data: np.ndarray, affine: np.ndarray) -> None:
    """Every voxel of ``volume`` sits on a voxel of ``data`` (with RAS ``affine``) and holds its value."""
    continuous = (voxel_world_ras(volume) - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    index = np.rint(continuous)
    assert np.abs(continuous - index).max() < 1e-3
    index = index.astype(int)
    assert (index >= 0).all() and (index < data.shape).all() and data.size == volume[0].numel()
    np.testing.assert_allclose(volume[0].numpy().reshape(-1), data[tuple(index.T)], rtol=0, atol=1e-3)


def sitk_image(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image of ``data`` ``(X, Y, Z)`` placed by the RAS ``affine``."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    return image


def write_file(path, data: np.ndarray, affine: np.ndarray, compress: bool = False):
    """Write ``data`` with nibabel (NIfTI) or SimpleITK (everything else)."""
    path = str(path)
    if path.endswith((".nii", ".nii.gz")):
        nib.save(nib.Nifti1Image(data, affine), path)
    else:
        sitk.WriteImage(sitk_image(data, affine), path, useCompression=compress)
    return path


def truncate(path, keep: float = 0.5) -> None:
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: int(len(blob) * keep)])


def assert_header_agrees(path, volume: MetaTensor, **kwargs) -> None:
    header = read_header(path, **kwargs)
    assert header.shape == tuple(volume.shape[1:])
    np.testing.assert_allclose(header.affine, volume.affine.numpy(), atol=1e-9)
    np.testing.assert_allclose(header.spacing, np.linalg.norm(volume.affine.numpy()[:3, :3], axis=0))
    assert header.modality == volume.meta.get("modality") and header.series_uid == volume.meta.get("series_uid")


# ----------------------------------------------------------------------------- real files


def test_real_ct_series_matches_simpleitk():
    folder = os.path.join(PYDICOM_DATA, "dicomdirtests", "98892001", "CT5N")
    volume = read_volume(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
    assert_matches_simpleitk(volume, reader.Execute())
    assert volume.shape == (1, 16, 16, 5) and volume.meta["modality"] == "CT"
    assert volume.meta["series_uid"] == pydicom.dcmread(os.path.join(folder, "2062")).SeriesInstanceUID
    assert volume.min() < -800  # HU: the stored values are rescaled by intercept -1024
    assert_header_agrees(folder, volume)


def test_real_nifti_matches_simpleitk():
    path = os.path.join(NIBABEL_DATA, "anatomical.nii")
    volume = read_volume(path)
    assert_matches_simpleitk(volume, sitk.ReadImage(path))
    assert volume.meta["filename_or_obj"] == path and volume.meta["space"] == "RAS"
    assert_header_agrees(path, volume)


def test_real_4d_nifti_needs_a_frame_then_reads_it():
    path = os.path.join(NIBABEL_DATA, "example4d.nii.gz")
    message = r"4D image with 2 frames; expected a 3D volume \(pass frame=K with 0 <= K < 2 to choose one\)"
    with pytest.raises(VolumeError, match=message):
        read_volume(path)
    volume = read_volume(path, frame=1)
    image = sitk.ReadImage(path)
    frame = sitk.Extract(image, [*image.GetSize()[:3], 0], [0, 0, 0, 1])
    assert_matches_simpleitk(volume, frame)
    header = read_header(path)
    assert header.n_frames == 2 and header.shape == tuple(volume.shape[1:])
    np.testing.assert_allclose(header.affine, volume.affine.numpy())
    with pytest.raises(VolumeError, match=r"frame=2 is out of range: the 4D image has 2 frames") as info:
        read_volume(path, frame=2)
    assert info.value.kind == "bad-frame"


# ----------------------------------------------------------------------------- synthetic files, every format


@pytest.mark.parametrize("orientation", sorted(AFFINES))
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"])
def test_file_formats_match_simpleitk_and_source(tmp_path, suffix, orientation):
    data, affine = synthetic_volume(), AFFINES[orientation]
    path = write_file(tmp_path / f"volume{suffix}", data, affine, compress=suffix in (".mha", ".nrrd"))
    volume = read_volume(path)
    assert_matches_array(volume, data, affine)
    assert_matches_simpleitk(volume, sitk.ReadImage(path))
    assert_header_agrees(path, volume)
    assert read_header(path).n_frames == 1


@pytest.mark.parametrize("orientation", sorted(AFFINES))
def test_dicom_series_with_misleading_names_matches_simpleitk(tmp_path, orientation):
    data, affine = synthetic_volume(1), AFFINES[orientation]
    n = data.shape[2]
    order = np.random.default_rng(2).permutation(n)
    names = [f"IM{order[k]:04d}" for k in range(n)]  # file name order says nothing about position
    paths = write_dicom_series(data, affine, tmp_path / "series", SeriesTags("CT", "p", rescale_intercept=-1024.0),
                               file_names=names)
    for path, number in zip(paths, np.random.default_rng(3).permutation(n)):  # neither do InstanceNumbers
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = int(number) + 1
        ds.save_as(path)
    volume = read_volume(tmp_path / "series")
    assert_matches_array(volume, data, affine)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    assert_matches_simpleitk(volume, reader.Execute())
    assert_header_agrees(tmp_path / "series", volume)


def test_dicom_per_slice_rescale(tmp_path):
    data, affine = synthetic_volume(4), AFFINES["oblique"]
    paths = write_dicom_series(data, affine, tmp_path / "s", SeriesTags("CT", "p", rescale_intercept=-1024.0))
    for k in range(0, len(paths), 3):  # re-store every third slice with its own slope and intercept
        ds = pydicom.dcmread(paths[k])
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -2000.0
        ds.PixelData = ((data[:, :, k].T.astype(np.float64) + 2000.0) / 0.5).astype("<i2").tobytes()
        ds.save_as(paths[k])
    volume = read_volume(tmp_path / "s")
    assert_matches_array(volume, data, affine)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    assert_matches_simpleitk(volume, reader.Execute())


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_enhanced_multiframe_matches_simpleitk(tmp_path, modality):
    data, affine = synthetic_volume(5), AFFINES["permuted"]
    if modality == "MR":
        data = data + 1000.0
    path = write_multiframe_dicom(data, affine, tmp_path / "enhanced.dcm",
                                  SeriesTags(modality, "p", rescale_slope=2.0, rescale_intercept=-1000.0))
    volume = read_volume(path)
    assert_matches_array(volume, np.rint((data + 1000.0) / 2.0) * 2.0 - 1000.0, affine)
    assert_matches_simpleitk(volume, sitk.ReadImage(str(path)))
    assert volume.meta["modality"] == modality
    assert_header_agrees(path, volume)


def test_scaled_nifti_applies_slope_and_intercept(tmp_path):
    stored = np.random.default_rng(6).integers(-100, 100, size=SHAPE).astype(np.int16)
    image = nib.Nifti1Image(stored, AFFINES["flipped"])
    image.header.set_slope_inter(0.5, 10.0)
    path = str(tmp_path / "scaled.nii.gz")
    nib.save(image, path)
    volume = read_volume(path)
    assert_matches_array(volume, stored * 0.5 + 10.0, AFFINES["flipped"])
    assert_matches_simpleitk(volume, sitk.ReadImage(path))


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_4d_simpleitk_formats_read_the_chosen_frame(tmp_path, suffix):
    frames = [synthetic_volume(seed) for seed in range(3)]
    images = [sitk_image(f, AFFINES["oblique"]) for f in frames]
    path = str(tmp_path / f"series{suffix}")
    sitk.WriteImage(sitk.JoinSeries(images), path)
    with pytest.raises(VolumeError, match=r"4D image with 3 frames; expected a 3D volume") as info:
        read_volume(path)
    assert info.value.kind == "dimensionality"
    volume = read_volume(path, frame=2)
    assert_matches_array(volume, frames[2], AFFINES["oblique"])
    header = read_header(path)
    assert header.n_frames == 3 and header.shape == tuple(volume.shape[1:])


def test_trailing_singleton_dimension_is_3d(tmp_path):
    data = synthetic_volume()
    path = str(tmp_path / "singleton.nii.gz")
    nib.save(nib.Nifti1Image(data[..., None], AFFINES["ras"]), path)
    assert_matches_array(read_volume(path), data, AFFINES["ras"])
    assert_matches_array(read_volume(path, frame=0), data, AFFINES["ras"])
    assert read_header(path).n_frames == 1


def test_volume_is_ras_for_monai():
    """MONAI's own Orientation(RAS) leaves our volumes unchanged (they are RAS by its definition)."""
    path = os.path.join(NIBABEL_DATA, "example4d.nii.gz")
    volume = read_volume(path, frame=0)
    again = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(volume)
    assert torch.equal(again.as_tensor(), volume.as_tensor())
    np.testing.assert_allclose(again.affine.numpy(), volume.affine.numpy())


# ----------------------------------------------------------------------------- errors


def test_truncated_nifti_gz_raises_never_reads_zeros(tmp_path):
    path = write_file(tmp_path / "cut.nii.gz", synthetic_volume(), AFFINES["ras"])
    truncate(path)
    with pytest.raises(VolumeError, match=r"cut\.nii\.gz: compressed pixel data ends early") as info:
        read_volume(path)
    assert info.value.kind == "truncated" and isinstance(info.value.__cause__, EOFError)


@pytest.mark.parametrize("suffix", [".nii", ".nrrd", ".mha"])
def test_truncated_uncompressed_files_raise_from_header(tmp_path, suffix):
    path = write_file(tmp_path / f"cut{suffix}", synthetic_volume().astype(np.int16), AFFINES["ras"])
    truncate(path, keep=0.75)
    expected = int(np.prod(SHAPE)) * 2
    message = rf"holds \d+ bytes of pixel data; its header promises {expected} \(17x19x23 voxels x 2 bytes\)"
    for read in (read_volume, read_header):
        with pytest.raises(VolumeError, match=message) as info:
            read(path)
        assert info.value.kind == "truncated"


@pytest.mark.parametrize("suffix,data_suffix", [(".mhd", ".raw"), (".nhdr", ".raw")])
def test_truncated_detached_data_file(tmp_path, suffix, data_suffix):
    path = write_file(tmp_path / f"cut{suffix}", synthetic_volume().astype(np.int16), AFFINES["ras"])
    data_file = tmp_path / f"cut{data_suffix}"
    truncate(data_file, keep=0.5)
    with pytest.raises(VolumeError, match=r"holds \d+ bytes of pixel data in cut\.raw; its header promises 14858"):
        read_volume(path)
    data_file.unlink()
    with pytest.raises(VolumeError, match=r"pixel data file .*cut\.raw named in the header does not exist") as info:
        read_volume(path)
    assert info.value.kind == "missing"


def test_truncated_compressed_metaimage(tmp_path):
    path = write_file(tmp_path / "cut.mha", synthetic_volume().astype(np.int16), AFFINES["ras"], compress=True)
    truncate(path, keep=0.8)
    with pytest.raises(VolumeError, match=r"holds \d+ bytes of pixel data; its header promises \d+ \(compressed\)"):
        read_volume(path)


def test_truncated_compressed_nrrd(tmp_path):
    path = write_file(tmp_path / "cut.nrrd", synthetic_volume().astype(np.int16), AFFINES["ras"], compress=True)
    truncate(path, keep=0.8)
    with pytest.raises(VolumeError, match=r"cut\.nrrd: compressed pixel data ends early: it decompresses to \d+ "
                                          r"bytes; its header promises 14858") as info:
        read_volume(path)
    assert info.value.kind == "truncated"


@pytest.mark.parametrize("name", ["corrupt.mha", "corrupt.nrrd"])
def test_corrupt_compressed_simpleitk_formats(tmp_path, name):
    """ITK inflates a damaged stream without complaint; our checksum check refuses it."""
    path = write_file(tmp_path / name, synthetic_volume(), AFFINES["ras"], compress=True)
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2: len(blob) // 2 + 64] = bytes(64)
    open(path, "wb").write(bytes(blob))
    with pytest.raises(VolumeError, match=r"corrupt compressed pixel data: ") as info:
        read_volume(path)
    assert info.value.kind == "unreadable" and isinstance(info.value.__cause__, zlib.error)


def test_non_finite_voxels_are_counted(tmp_path):
    data = synthetic_volume()
    data[0, 0, 0] = data[1, 2, 3] = np.nan
    data[4, 4, 4] = -np.inf
    path = write_file(tmp_path / "nan.nii.gz", data, AFFINES["ras"])
    with pytest.raises(VolumeError, match=r"3 of 7429 voxels are not finite \(2 NaN, 1 infinite\); expected finite"):
        read_volume(path)


@pytest.mark.parametrize(
    "name,array",
    [("flat.nii.gz", np.zeros((16, 16), np.float32)), ("slice.nii.gz", np.zeros((16, 16, 1), np.float32)),
     ("flat.mha", np.zeros((16, 16), np.float32))],
)
def test_2d_images_raise_dimensionality(tmp_path, name, array):
    path = str(tmp_path / name)
    if name.endswith(".mha"):
        sitk.WriteImage(sitk.GetImageFromArray(array), path)
    else:
        nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    for read in (read_volume, read_header):
        with pytest.raises(VolumeError, match=r"2D image \(16x16(x1)?\); expected a 3D volume") as info:
            read(path)
        assert info.value.kind == "dimensionality"


def test_frame_errors(tmp_path):
    path = write_file(tmp_path / "three.nii.gz", synthetic_volume(), AFFINES["ras"])
    with pytest.raises(VolumeError, match=r"frame=1 given, but the image is 3D \(17, 19, 23\)") as info:
        read_volume(path, frame=1)
    assert info.value.kind == "bad-frame"
    four = os.path.join(NIBABEL_DATA, "example4d.nii.gz")
    with pytest.raises(VolumeError, match=r"frame=-1 is out of range"):
        read_volume(four, frame=-1)
    with pytest.raises(VolumeError, match=r"frame must be an integer, got True"):
        read_volume(four, frame=True)


def test_rgb_and_vector_images_raise_non_scalar(tmp_path):
    rgb_type = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb = np.zeros(SHAPE, dtype=rgb_type)
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(tmp_path / "rgb.nii.gz"))
    with pytest.raises(VolumeError, match=r"RGB voxels \(NIfTI dtype .*\); expected one real value per voxel") as info:
        read_volume(tmp_path / "rgb.nii.gz")
    assert info.value.kind == "non-scalar"
    vector = sitk.GetImageFromArray(np.zeros((*SHAPE, 3), np.float32), isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "vector.nrrd"))
    with pytest.raises(VolumeError, match=r"voxels are vector of 32-bit float with 3 component\(s\)"):
        read_header(tmp_path / "vector.nrrd")
    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, 1, 3), np.float32), np.eye(4)), str(tmp_path / "vector.nii.gz"))
    with pytest.raises(VolumeError, match=r"vector image of shape \(17, 19, 23, 1, 3\) \(3 components per voxel\)"):
        read_volume(tmp_path / "vector.nii.gz")


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(VolumeError, match=r"nowhere\.nii\.gz: no such file or directory") as info:
        read_volume(tmp_path / "nowhere.nii.gz")
    assert info.value.kind == "missing" and info.value.path == str(tmp_path / "nowhere.nii.gz")
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for name, message in [
        ("garbage.nii.gz", r"garbage\.nii\.gz: not a readable NIfTI file: "),
        ("garbage.nrrd", r"garbage\.nrrd: not a readable nrrd file: "),
        ("garbage.mha", r"garbage\.mha: not a readable metaimage file: "),
        ("garbage", r"garbage: unknown format: expected a \.nii, \.nii\.gz, .* file, a DICOM file or a DICOM series"),
        ("notes.txt", r"notes\.txt: unknown format"),
    ]:
        (tmp_path / name).write_bytes(garbage)
        for read in (read_volume, read_header):
            with pytest.raises(VolumeError, match=message) as info:
                read(tmp_path / name)
            assert info.value.kind == "unreadable"
            assert info.value.__cause__ is not None or "unknown format" in info.value.reason


def test_corrupt_gzip_is_unreadable(tmp_path):
    """Damage inside the deflate stream is caught by gzip's CRC, not read as wrong voxels."""
    path = write_file(tmp_path / "corrupt.nii.gz", synthetic_volume(), AFFINES["ras"])
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2: len(blob) // 2 + 64] = bytes(64)  # damage the deflate stream, keep the length
    open(path, "wb").write(bytes(blob))
    with pytest.raises(VolumeError, match=r"corrupt\.nii\.gz: corrupt compressed data: ") as info:
        read_volume(path)
    assert info.value.kind == "unreadable" and info.value.__cause__ is not None


def test_series_uid_for_a_file_format(tmp_path):
    path = write_file(tmp_path / "v.nii.gz", synthetic_volume(), AFFINES["ras"])
    with pytest.raises(VolumeError, match=r"series_uid '1\.2\.3' given, but this is a nifti file"):
        read_volume(path, series_uid="1.2.3")


def test_empty_directory(tmp_path):
    with pytest.raises(VolumeError, match=r"empty directory; expected DICOM files of one series"):
        read_volume(tmp_path)


def test_error_kinds_are_checked_and_errors_pickle():
    err = VolumeError("/data/a.nii.gz", "truncated", "holds 10 bytes; expected 20")
    assert str(err) == "/data/a.nii.gz: holds 10 bytes; expected 20"
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.kind, again.reason, str(again)) == (err.path, err.kind, err.reason, str(err))
    assert "truncated" in ERROR_KINDS
    with pytest.raises(ValueError, match=r"VolumeError kind 'bogus' is not one of missing, unreadable"):
        VolumeError("x", "bogus", "y")


# ----------------------------------------------------------------------------- volume_format


def test_volume_format_by_name_and_magic(tmp_path):
    dicom_file = pydicom.data.get_testdata_file("CT_small.dcm")
    shutil.copy(dicom_file, tmp_path / "1.2.840.113619.2.55.3.1")  # UID-named: its "suffix" is ".1"
    shutil.copy(dicom_file, tmp_path / "IMAGE0001")
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("x" * 200)
    (tmp_path / "scan.png").write_bytes(b"\x89PNG" + bytes(200))
    expected = {
        "a.nii": "nifti", "a.NII.GZ": "nifti", "a.nrrd": "nrrd", "a.nhdr": "nrrd", "a.mha": "metaimage",
        "a.mhd": "metaimage", "x.dcm": "dicom", "1.2.840.113619.2.55.3.1": "dicom", "IMAGE0001": "dicom",
        "meta.json": None, "notes.txt": None, "scan.png": None, "absent": None,
    }
    for name in ("a.nii", "a.NII.GZ", "a.nrrd", "a.nhdr", "a.mha", "a.mhd", "x.dcm"):
        (tmp_path / name).write_bytes(b"")
    for name, fmt in expected.items():
        assert volume_format(tmp_path / name) == fmt, name
    assert volume_format(tmp_path) == "dicom"  # holds DICOM files
    (tmp_path / "empty").mkdir()
    assert volume_format(tmp_path / "empty") is None
    assert volume_format(PYDICOM_DATA + "/dicomdirtests/98892001/CT5N") == "dicom"


def test_volume_format_reads_only_the_first_bytes(tmp_path, monkeypatch):
    big = tmp_path / "big"
    big.write_bytes(bytes(1 << 20))
    sizes = []

    class Recorder:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def read(self, size=-1):
            sizes.append(size)
            return self.handle.read(size)

    monkeypatch.setattr(dicom_module, "open", lambda path, mode: Recorder(open(path, mode)), raising=False)
    assert volume_format(big) is None
    assert sizes == [132]

