"""Benchmark data: CT volumes at a realistic size, written deterministically as ``.nii.gz``.

The demo data's CT phantoms are small (about 77 x 77 x 72 voxels of 5 mm). The data benchmarks
need volumes of the size a scanner writes, so :func:`write_bench_ct` resamples the demo CT
phantoms (:func:`volpre.demo.synthetic.write_demo_data`) to a finer grid (default 256 x 256 x
200 voxels of 1.4 x 1.4 x 1.6 mm), adds Gaussian noise of 12 HU (real CT noise, which is what
makes CT hard to compress) and stores int16 HU, one gzip-compressed NIfTI per volume (about 16 MB
each at the default size). Same arguments, same bytes.

The manifest may list more entries than there are files (``entries > volumes``): entry ``k``
names file ``k % volumes`` under its own id, which lets a benchmark stream many entries without
writing many files.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.transforms import ResizeWithPadOrCrop, Spacing

from volpre.bench.errors import BenchError
from volpre.data.manifest import Manifest, ManifestEntry, load_manifest, save_manifest
from volpre.data.readers import read_volume
from volpre.demo.synthetic import write_demo_data
from volpre.files import check_new_output

DEFAULT_SHAPE = (256, 256, 200)
DEFAULT_SPACING = (1.4, 1.4, 1.6)
NOISE_HU = 12.0
_HU_RANGE = (-1024, 3071)


def write_bench_ct(out_dir: Path, volumes: int, entries: int | None = None,
                   shape: tuple[int, int, int] = DEFAULT_SHAPE,
                   spacing: tuple[float, float, float] = DEFAULT_SPACING, seed: int = 0) -> Path:
    """Write ``volumes`` CT ``.nii.gz`` files and a manifest of ``entries`` (default: ``volumes``)
    entries under ``out_dir`` (which must not exist or be empty); return the manifest path.

    Each volume: int16 HU in [-1024, 3071], ``shape`` voxels of ``spacing`` mm in RAS order.
    """
    out_dir = Path(out_dir)
    entries = volumes if entries is None else entries
    if volumes < 1 or entries < 1:
        raise BenchError(f"benchmark data needs volumes >= 1 and entries >= 1, got {volumes} and {entries}")
    if any(s < 2 for s in shape) or any(s <= 0 for s in spacing):
        raise BenchError(f"benchmark volumes need shape >= 2 and spacing > 0 per axis, got {shape} and {spacing}")
    check_new_output(out_dir, "benchmark volumes output", " (remove it or choose another path)")
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    phantoms = _demo_ct_phantoms(min(volumes, 4), seed, shape, spacing)
    paths = []
    for k in range(volumes):
        base, affine = phantoms[k % len(phantoms)]
        rng = np.random.default_rng([seed, k])
        hu = base + rng.normal(0.0, NOISE_HU, size=base.shape).astype(np.float32)
        image = nib.Nifti1Image(np.clip(np.rint(hu), *_HU_RANGE).astype(np.int16), affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        image.header.set_xyzt_units("mm")
        path = out_dir / "images" / f"ct{k:04d}.nii.gz"
        nib.save(image, path)
        paths.append(path)
    listed = [ManifestEntry(image=(paths[k % volumes],), id=f"ct{k:05d}", subject=f"ct{k % volumes:04d}",
                            modality="CT", split="train", shape=tuple(shape), spacing=tuple(spacing))
              for k in range(entries)]
    manifest = out_dir / "manifest.json"
    save_manifest(Manifest(entries=listed, description=f"volpre benchmark CT: {volumes} volumes of {shape} voxels, "
                                                       f"{entries} entries, seed {seed}"), manifest)
    return manifest


def _demo_ct_phantoms(count: int, seed: int, shape: tuple[int, int, int],
                      spacing: tuple[float, float, float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` demo CT phantoms resampled to ``spacing`` and padded/cropped to ``shape`` around
    their centre: float32 HU arrays and their affines."""
    with tempfile.TemporaryDirectory(prefix="volpre-bench-demo-") as tmp:
        demo = load_manifest(write_demo_data(Path(tmp) / "demo", subjects=count, seed=seed))
        cts = [e for e in demo.entries if e.modality == "CT"][:count]
        resample = Spacing(pixdim=spacing, mode="bilinear", padding_mode="border")
        fit = ResizeWithPadOrCrop(shape, mode="constant", value=-1000.0)
        phantoms = []
        for entry in cts:
            volume = fit(resample(read_volume(entry.image[0], series_uid=entry.series_uid)))
            phantoms.append((np.asarray(volume[0], dtype=np.float32), np.asarray(volume.affine, dtype=np.float64)))
    return phantoms
