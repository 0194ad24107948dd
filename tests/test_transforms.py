"""Preprocessing presets (volpre.data.transforms): shapes, value ranges, labels, crops and the window."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import ScaleIntensityRange

from phantom_files import AFFINE, mr_phantom, write_phantom_files
from volpre.config import DataConfig, PreprocessConfig
from volpre.data.errors import VolumeError
from volpre.data.transforms import CROP_DTYPE, CropWindow, crops_at, draw_crop_starts, preprocess_transforms


@pytest.fixture
def files(tmp_path):
    return write_phantom_files(tmp_path)


def test_ct_preset_resamples_crops_foreground_and_keeps_hu(files):
    cfg = PreprocessConfig(spacing=(4.0, 4.0, 3.0))
    out = preprocess_transforms(cfg, "CT", with_label=True)(
        {"image": str(files / "ct.nii.gz"), "label": str(files / "label.nii.gz")})
    image, label = out["image"], out["label"]
    # body box 28 x 24 x 18 voxels of 2/2/3 mm -> 14 x 12 x 18 at 4/4/3 mm, plus the 2-voxel margin
    assert image.shape == label.shape == (1, 18, 16, 22)
    assert float(image.max()) == pytest.approx(700.0, abs=1.0) and float(image.min()) == pytest.approx(-1000.0, abs=0.01)
    assert set(torch.unique(label).tolist()) == {0.0, 1.0}  # nearest neighbour keeps classes
    np.testing.assert_allclose(np.abs(np.diag(np.asarray(image.affine))[:3]), [4.0, 4.0, 3.0])
    assert float(image[label > 0].mean()) == pytest.approx(700.0, abs=30.0)  # label still on the bone


def test_ct_crops_are_hu_in_float16_and_the_window_maps_them_to_unit_range(files):
    pre, data = PreprocessConfig(spacing=(4.0, 4.0, 3.0)), DataConfig(roi=(32, 32, 32), crops_per_volume=3)
    volume = preprocess_transforms(pre, "CT")({"image": str(files / "ct.nii.gz")})["image"]
    starts = draw_crop_starts(volume.shape[1:], data.roi, data.crops_per_volume, np.random.default_rng(0))
    crops = crops_at(volume, starts, pre, data, "CT")
    assert len(crops) == 3
    for crop in crops:
        assert crop.shape == (1, 32, 32, 32) and crop.dtype == CROP_DTYPE  # padded up from 18 x 16 x 22
        assert float(crop.min()) == pre.ct_window[0]  # the padding is air, in HU
        assert float(crop.max()) == pytest.approx(700.0, abs=1.0)
    batch = torch.stack(crops)
    windowed = CropWindow(pre, ["CT"])(batch, torch.zeros(3, dtype=torch.int64))
    assert windowed.dtype == torch.float32
    assert float(windowed.min()) == 0.0 and float(windowed.max()) <= 1.0
    low, high = pre.ct_window
    expected = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(batch.float())
    assert torch.equal(windowed, torch.as_tensor(expected))  # the window as it ran in the workers before


def test_the_window_touches_only_the_ct_crops_of_a_batch():
    pre = PreprocessConfig(ct_window=(-175.0, 250.0))
    crops = torch.tensor([-500.0, -175.0, 0.0, 37.5, 250.0, 900.0]).to(CROP_DTYPE).reshape(6, 1, 1, 1, 1)
    modality = torch.tensor([0, 1, 2, 0, 1, 2])  # CT, MR, CT/contrast
    windowed = CropWindow(pre, ["CT", "MR", "CT/contrast"])(crops, modality).flatten().tolist()
    assert windowed == pytest.approx([0.0, -175.0, 175.0 / 425.0, 212.5 / 425.0, 250.0, 1.0])
    mr_only = CropWindow(pre, ["CT", "MR"])(crops[[1, 4]], torch.tensor([1, 1])).flatten().tolist()
    assert mr_only == [-175.0, 250.0]
    plan = CropWindow(pre, ["CT", "MR"], windowed=False)(crops, torch.zeros(6, dtype=torch.int64))
    assert torch.equal(plan, crops.float())  # an nnU-Net plan's values are normalised already


def test_mr_preset_z_scores_the_foreground(files):
    cfg = PreprocessConfig(spacing=(2.0, 2.0, 3.0), mr_percentiles=(1.0, 99.0))
    out = preprocess_transforms(cfg, "MR")({"image": str(files / "mr.nii.gz")})
    image = out["image"][0]
    tissue = image[2:-2, 2:-2, 2:-2]  # the phantom's tissue block after the foreground crop (margin 2)
    assert image.shape == (24, 24, 16)
    assert float(tissue.mean()) == pytest.approx(0.0, abs=0.02)
    assert float(tissue.std()) == pytest.approx(1.0, abs=0.02)
    assert float(image.max()) < 3.0  # clipped at the 99th percentile (about 2.3 sd)
    background = image[0]
    assert float(background.max()) < float(tissue.min())  # background stays darker than any tissue


def test_multi_channel_images_stack_and_must_share_a_grid(files, tmp_path):
    cfg = PreprocessConfig(spacing=(2.0, 2.0, 3.0))
    out = preprocess_transforms(cfg, "MR")({"image": [str(files / "mr.nii.gz"), str(files / "mr2.nii.gz")]})
    assert out["image"].shape[0] == 2
    nib.save(nib.Nifti1Image(mr_phantom((30, 32, 20)), AFFINE), tmp_path / "other_grid.nii.gz")
    with pytest.raises(RuntimeError) as info:
        preprocess_transforms(cfg, "MR")({"image": [str(files / "mr.nii.gz"), str(tmp_path / "other_grid.nii.gz")]})
    cause = info.value.__cause__
    assert isinstance(cause, VolumeError) and cause.kind == "grid-mismatch"
    assert "differs from channel 0" in str(cause)


def test_unsupported_modality_is_named():
    with pytest.raises(VolumeError, match=r"modality 'PT'; preprocessing presets exist for CT, MR"):
        preprocess_transforms(PreprocessConfig(), "PT")
