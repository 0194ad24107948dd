"""The separable resampler (volpre.data.resample) against MONAI's Spacingd and numpy.interp."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Spacingd

from volpre.config import PreprocessConfig
from volpre.data.resample import AxisAlignedSpacingd, resample_separable
from volpre.data.transforms import preprocess_transforms


def _affine(angle: float, spacing, origin) -> np.ndarray:
    """An oblique affine: rotation about z and a tilt about x, columns scaled by ``spacing``."""
    c, s = np.cos(angle), np.sin(angle)
    rot_z = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    rot_x = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(0.2), -np.sin(0.2)], [0.0, np.sin(0.2), np.cos(0.2)]])
    affine = np.eye(4)
    affine[:3, :3] = rot_x @ rot_z @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def _volumes(shape=(40, 34, 22), seed=0):
    """A smooth CT-like image (HU) and a label of three classes, both deterministic."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(0))
    image = np.where(radius < 0.8, 50.0, -1000.0) + 300.0 * np.sin(5 * grid[0]) + rng.normal(0, 20, shape)
    label = (radius < 0.7).astype(np.float32) + (radius < 0.3)
    return image[None].astype(np.float32), label[None].astype(np.float32)


CASES = {
    "oblique, anisotropic, down and up": (_affine(0.3, (0.7, 0.9, 2.5), (10.0, -20.0, 5.0)), (1.5, 1.5, 1.5)),
    "axis-aligned, flipped (LPS-like)": (np.diag([-0.8, -0.8, 3.0, 1.0]), (2.0, 1.0, 1.2)),
    "oblique, upsampling only": (_affine(-1.1, (3.0, 3.0, 5.0), (0.0, 0.0, 0.0)), (1.3, 2.2, 1.7)),
}


def _both(affine, pixdim, **kwargs):
    image, label = _volumes()
    record = {"image": MetaTensor(torch.as_tensor(image), affine=torch.as_tensor(affine)),
              "label": MetaTensor(torch.as_tensor(label), affine=torch.as_tensor(affine))}
    args = dict(keys=["image", "label"], pixdim=pixdim, mode=["bilinear", "nearest"], padding_mode="border",
                dtype=np.float32)
    args.update(kwargs)
    monai_transform, ours_transform = Spacingd(**args), AxisAlignedSpacingd(**args)
    return monai_transform, monai_transform(dict(record)), ours_transform, ours_transform(dict(record))


def _tie_voxels(source_affine, out: MetaTensor) -> np.ndarray:
    """``(X', Y', Z')`` bool: output voxels whose input index is within rounding of a .5 on some axis
    (there nearest-neighbour may pick either input voxel)."""
    xform = np.linalg.solve(np.asarray(source_affine, np.float64), np.asarray(out.affine, np.float64))
    near = []
    for axis, n in enumerate(out.shape[1:]):
        position = np.arange(n) * xform[axis, axis] + xform[axis, 3]
        near.append(np.abs(position - np.floor(position) - 0.5) < 1e-3)
    return near[0][:, None, None] | near[1][None, :, None] | near[2][None, None, :]


@pytest.mark.parametrize("case", list(CASES))
def test_grid_affine_and_values_are_monais(case):
    affine, pixdim = CASES[case]
    _, monai_out, _, ours = _both(affine, pixdim)
    for key in ("image", "label"):
        assert ours[key].shape == monai_out[key].shape
        assert ours[key].dtype == monai_out[key].dtype == torch.float32
        np.testing.assert_allclose(np.asarray(ours[key].affine), np.asarray(monai_out[key].affine), atol=1e-9)
    # bilinear: MONAI's trilinear interpolation up to float32 rounding of its sampling grid
    scale = float(monai_out["image"].abs().max())
    np.testing.assert_allclose(ours["image"].numpy(), monai_out["image"].numpy(), rtol=0, atol=2e-5 * scale)
    # nearest: identical away from halfway positions
    differs = (ours["label"] != monai_out["label"]).numpy()[0]
    assert not (differs & ~_tie_voxels(affine, ours["label"])).any()
    assert set(torch.unique(ours["label"]).tolist()) <= {0.0, 1.0, 2.0}


def test_the_trace_is_monais_and_inverts_like_it():
    affine, pixdim = CASES["oblique, anisotropic, down and up"]
    monai_transform, monai_out, ours_transform, ours = _both(affine, pixdim)
    mine, theirs = ours["image"].applied_operations[-1], monai_out["image"].applied_operations[-1]
    assert set(mine) == set(theirs)
    assert mine["orig_size"] == theirs["orig_size"] and mine["lazy"] is theirs["lazy"] is False
    for key in ("dtype", "mode", "padding_mode", "align_corners"):
        assert mine["extra_info"][key] == theirs["extra_info"][key]
    np.testing.assert_allclose(np.asarray(mine["extra_info"]["src_affine"]), np.asarray(theirs["extra_info"]["src_affine"]))
    inverted, monai_inverted = ours_transform.inverse(ours), monai_transform.inverse(monai_out)
    for key in ("image", "label"):
        assert inverted[key].shape == monai_inverted[key].shape == (1, 40, 34, 22)
        np.testing.assert_allclose(np.asarray(inverted[key].affine), affine, atol=1e-6)
        assert not inverted[key].applied_operations


def test_other_modes_fall_back_to_monais_resampling():
    affine, pixdim = CASES["oblique, anisotropic, down and up"]
    _, monai_out, _, ours = _both(affine, pixdim, mode=[3, "nearest"], padding_mode=["reflect", "zeros"])
    for key in ("image", "label"):
        assert torch.equal(ours[key].as_tensor(), monai_out[key].as_tensor())


def test_an_unchanged_grid_is_left_as_monai_leaves_it():
    image, _ = _volumes()
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    record = {"image": MetaTensor(torch.as_tensor(image), affine=torch.as_tensor(affine))}
    ours = AxisAlignedSpacingd("image", pixdim=(1.5, 1.5, 1.5))(dict(record))
    theirs = Spacingd("image", pixdim=(1.5, 1.5, 1.5))(dict(record))
    assert torch.equal(ours["image"].as_tensor(), theirs["image"].as_tensor())
    assert torch.equal(ours["image"].as_tensor(), torch.as_tensor(image))


def test_separable_resampling_is_numpys_linear_interpolation_per_axis():
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(2, 9, 7, 5))
    scale, shift, shape = (0.6, 1.7, 1.0), (0.3, -0.4, 1.5), (16, 5, 4)
    out = resample_separable(torch.as_tensor(volume), scale, shift, shape, "bilinear").numpy()
    expected = volume
    for axis, (s, t, n) in enumerate(zip(scale, shift, shape)):
        position = np.arange(n) * s + t  # outside [0, n_in - 1]: numpy.interp holds the edge value
        expected = np.apply_along_axis(lambda line: np.interp(position, np.arange(line.size), line), axis + 1, expected)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    nearest = resample_separable(torch.as_tensor(volume), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (4, 7, 5), "nearest")
    np.testing.assert_array_equal(nearest.numpy(), volume[:, [0, 2, 4, 6]])
    with pytest.raises(ValueError, match="mode must be one of"):
        resample_separable(torch.as_tensor(volume), scale, shift, shape, "bicubic")


def test_the_preset_resamples_with_it(tmp_path):
    import nibabel as nib

    image, label = _volumes()
    affine = CASES["oblique, anisotropic, down and up"][0]
    nib.save(nib.Nifti1Image(image[0], affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(label[0].astype(np.uint8), affine), tmp_path / "label.nii.gz")
    preset = preprocess_transforms(PreprocessConfig(spacing=(1.5, 1.5, 1.5), crop_foreground=False), "CT",
                                   with_label=True)
    assert isinstance(preset.transforms[1], AxisAlignedSpacingd)
    record = {"image": str(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "label.nii.gz")}
    ours = preset(dict(record))
    loaded = preset.transforms[0](dict(record))
    theirs = Spacingd(["image", "label"], pixdim=(1.5, 1.5, 1.5), mode=["bilinear", "nearest"],
                      padding_mode="border", dtype=np.float32)(loaded)
    assert ours["image"].shape == theirs["image"].shape
    np.testing.assert_allclose(np.asarray(ours["image"].affine), np.asarray(theirs["image"].affine), atol=1e-9)
    np.testing.assert_allclose(ours["image"].numpy(), theirs["image"].numpy(), rtol=0, atol=0.05)
