"""Small NIfTI phantoms shared by test_transforms.py (presets) and test_dataset.py (the crop stream)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def ct_phantom(shape=(40, 36, 24)) -> tuple[np.ndarray, np.ndarray]:
    """Air around a soft-tissue box holding a bright 'bone' block; label 1 on the bone."""
    hu = np.full(shape, -1000.0, np.float32)
    hu[6:-6, 6:-6, 3:-3] = 40.0
    hu[15:25, 15:25, 8:16] = 700.0
    label = np.zeros(shape, np.uint8)
    label[15:25, 15:25, 8:16] = 1
    return hu, label


def mr_phantom(shape=(32, 32, 20), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mr = rng.uniform(0, 5, shape).astype(np.float32)  # background noise
    mr[6:-6, 6:-6, 4:-4] = rng.normal(400, 60, (shape[0] - 12, shape[1] - 12, shape[2] - 8))
    return mr


def write_phantom_files(folder: Path) -> Path:
    """``ct.nii.gz``, ``label.nii.gz`` (label 1 on the bone), ``mr.nii.gz`` and ``mr2.nii.gz`` in ``folder``."""
    hu, label = ct_phantom()
    nib.save(nib.Nifti1Image(hu, AFFINE), folder / "ct.nii.gz")
    nib.save(nib.Nifti1Image(label, AFFINE), folder / "label.nii.gz")
    nib.save(nib.Nifti1Image(mr_phantom(), AFFINE), folder / "mr.nii.gz")
    nib.save(nib.Nifti1Image(mr_phantom(seed=1), AFFINE), folder / "mr2.nii.gz")
    return folder
