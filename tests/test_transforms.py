"""Preprocessing presets (shapes, value ranges, labels) and the pretraining data stream."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from volpre.config import DataConfig, PreprocessConfig
from volpre.data import dataset as dataset_module
from volpre.data.dataset import (BadEntryLog, InfiniteShardSampler, PretrainDataset, VolumeGroups, item_seed,
                                 loader_workers)
from volpre.data.errors import VolumeError
from volpre.data.manifest import ManifestEntry
from volpre.data.transforms import crops_at, draw_crop_starts, preprocess_transforms

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _ct_phantom(shape=(40, 36, 24)) -> tuple[np.ndarray, np.ndarray]:
    """Air around a soft-tissue box holding a bright 'bone' block; label 1 on the bone."""
    hu = np.full(shape, -1000.0, np.float32)
    hu[6:-6, 6:-6, 3:-3] = 40.0
    hu[15:25, 15:25, 8:16] = 700.0
    label = np.zeros(shape, np.uint8)
    label[15:25, 15:25, 8:16] = 1
    return hu, label


def _mr_phantom(shape=(32, 32, 20), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mr = rng.uniform(0, 5, shape).astype(np.float32)  # background noise
    mr[6:-6, 6:-6, 4:-4] = rng.normal(400, 60, (shape[0] - 12, shape[1] - 12, shape[2] - 8))
    return mr


@pytest.fixture
def files(tmp_path):
    hu, label = _ct_phantom()
    nib.save(nib.Nifti1Image(hu, AFFINE), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(label, AFFINE), tmp_path / "label.nii.gz")
    nib.save(nib.Nifti1Image(_mr_phantom(), AFFINE), tmp_path / "mr.nii.gz")
    nib.save(nib.Nifti1Image(_mr_phantom(seed=1), AFFINE), tmp_path / "mr2.nii.gz")
    return tmp_path


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


def test_ct_crops_are_windowed_to_unit_range(files):
    pre, data = PreprocessConfig(spacing=(4.0, 4.0, 3.0)), DataConfig(roi=(32, 32, 32), crops_per_volume=3)
    volume = preprocess_transforms(pre, "CT")({"image": str(files / "ct.nii.gz")})["image"]
    starts = draw_crop_starts(volume.shape[1:], data.roi, data.crops_per_volume, np.random.default_rng(0))
    crops = crops_at(volume, starts, pre, data, "CT")
    assert len(crops) == 3
    for crop in crops:
        assert crop.shape == (1, 32, 32, 32)  # padded up from 18 x 16 x 22
        assert float(crop.min()) >= 0.0 and float(crop.max()) <= 1.0
        assert float(crop.min()) == 0.0  # the padding is air


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
    nib.save(nib.Nifti1Image(_mr_phantom((30, 32, 20)), AFFINE), tmp_path / "other_grid.nii.gz")
    with pytest.raises(RuntimeError) as info:
        preprocess_transforms(cfg, "MR")({"image": [str(files / "mr.nii.gz"), str(tmp_path / "other_grid.nii.gz")]})
    cause = info.value.__cause__
    assert isinstance(cause, VolumeError) and cause.kind == "grid-mismatch"
    assert "differs from channel 0" in str(cause)


def test_unsupported_modality_is_named():
    with pytest.raises(VolumeError, match=r"modality 'PT'; preprocessing presets exist for CT, MR"):
        preprocess_transforms(PreprocessConfig(), "PT")


# ----------------------------------------------------------------------------- dataset


def _entries(files, n_good=3, bad=True):
    entries = [ManifestEntry(image=(files / "ct.nii.gz",), id=f"ct{i}", subject=f"s{i % 2}", modality="CT")
               for i in range(n_good)]
    entries.append(ManifestEntry(image=(files / "mr.nii.gz",), id="mr", subject="s0", modality="MR"))
    if bad:
        broken = files / "broken.nii.gz"
        broken.write_bytes((files / "ct.nii.gz").read_bytes()[:300])
        entries.insert(1, ManifestEntry(image=(broken,), id="broken", subject="s9", modality="CT"))
    return entries


def _dataset(files, tmp_path, on_bad="skip", by_subject=False, bad=True):
    data = DataConfig(roi=(16, 16, 16), crops_per_volume=2, on_bad_entry=on_bad)
    groups = VolumeGroups.build(_entries(files, bad=bad), by_subject=by_subject)
    log = BadEntryLog(tmp_path / "bad.jsonl")
    return PretrainDataset(groups, PreprocessConfig(spacing=(4.0, 4.0, 3.0)), data, seed=7, bad_entries=log), log


def test_items_are_a_pure_function_of_seed_epoch_and_item(files, tmp_path):
    dataset, _ = _dataset(files, tmp_path, bad=False)
    a, b, c = dataset[(0, 1)], dataset[(0, 1)], dataset[(1, 1)]
    assert len(a) == 2 and a[0]["image"].shape == (1, 16, 16, 16) and a[0]["image"].dtype == torch.float32
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(a, c))
    assert item_seed(7, 0, 1) != item_seed(7, 1, 0)


def test_bad_entry_is_recorded_and_replaced(files, tmp_path):
    dataset, log = _dataset(files, tmp_path)
    crops = dataset[(0, 1)]  # item 1 is the truncated file
    good = dataset[(0, 2)]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(crops, good))  # replaced by the next item
    records = log.read()
    assert [(r["id"], r["kind"]) for r in records] == [("broken", "truncated")]
    assert "broken.nii.gz: compressed pixel data ends early" in records[0]["reason"]
    dataset[(1, 1)]
    assert len(log.read()) == 1  # a known-bad entry is not read (or logged) again


def test_bad_entry_fails_fast_when_asked(files, tmp_path):
    dataset, _ = _dataset(files, tmp_path, on_bad="fail")
    with pytest.raises(VolumeError, match=r"broken\.nii\.gz: compressed pixel data ends early") as info:
        dataset[(0, 1)]
    assert info.value.kind == "truncated"


def test_all_bad_entries_stop_the_run(files, tmp_path):
    broken = files / "broken.nii.gz"
    broken.write_bytes(b"not a volume")
    groups = VolumeGroups.build([ManifestEntry(image=(broken,), id="b", modality="CT")], by_subject=False)
    dataset = PretrainDataset(groups, PreprocessConfig(), DataConfig(roi=(32, 32, 32)), seed=0)
    with pytest.raises(RuntimeError, match="every one of the 1 dataset items failed its checks"):
        dataset[(0, 0)]


def test_subject_items_draw_crops_from_several_scans(files, tmp_path):
    dataset, _ = _dataset(files, tmp_path, by_subject=True, bad=False)
    # subjects: s0 = ct0, ct2, mr (entries 0, 2, 3); s1 = ct1 (entry 1)
    assert len(dataset) == 2 and dataset.groups.scan_index == ((0, 2, 3), (1,))
    pairs = set()
    for epoch in range(12):
        crops = dataset[(epoch, 0)]
        assert {int(c["subject"]) for c in crops} == {0} and {int(c["item"]) for c in crops} == {0}
        scans = [int(c["scan"]) for c in crops]
        assert len(set(scans)) == 2  # two crops, two distinct scans
        pairs.add(frozenset(scans))
        assert not torch.equal(crops[0]["image"], crops[1]["image"])
    assert pairs == {frozenset(p) for p in ((0, 2), (0, 3), (2, 3))}  # every pair of the three scans is drawn
    single = dataset[(0, 1)]
    assert [int(c["scan"]) for c in single] == [1, 1] and {int(c["subject"]) for c in single} == {1}


def test_subject_items_split_by_modality(files):
    entries = _entries(files, bad=False)
    by_modality = VolumeGroups.build(entries, by_subject=True, by_modality=True)
    assert by_modality.scan_index == ((0, 2), (3,), (1,))  # s0 CT, s0 MR, s1 CT
    assert by_modality.subject_index == (0, 0, 1) and by_modality.items_with_several_scans() == 1
    per_entry = VolumeGroups.build(entries, by_subject=False)
    assert per_entry.scan_index == ((0,), (1,), (2,), (3,)) and per_entry.subject_index == (0, 1, 0, 0)


def test_sampler_shards_are_disjoint_and_resume_exactly():
    shards = [InfiniteShardSampler(10, seed=3, rank=r, world=3) for r in range(3)]
    first_epoch = [[item for _, item in zip(range(3), iter(s))] for s in shards]
    flat = [i for shard in first_epoch for i in shard]
    assert len(set(flat)) == 9  # 10 // 3 * 3 items, no overlap
    stream = iter(InfiniteShardSampler(10, seed=3, rank=1, world=3))
    full = [next(stream) for _ in range(8)]
    resumed = iter(InfiniteShardSampler(10, seed=3, rank=1, world=3, start=5))
    assert [next(resumed) for _ in range(3)] == full[5:]
    assert [e for e, _ in full] == [0, 0, 0, 1, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="2 dataset items cannot be sharded over 3 processes"):
        InfiniteShardSampler(2, seed=0, world=3)


def test_bad_entry_log_lines_are_json(files, tmp_path):
    log = BadEntryLog(tmp_path / "b.jsonl")
    log.record(ManifestEntry(image=(files / "x.nii.gz",), id="x"), VolumeError("x.nii.gz", "missing", "no such file"))
    record = json.loads((tmp_path / "b.jsonl").read_text())
    assert (record["kind"], record["reason"]) == ("missing", "x.nii.gz: no such file")


def test_loader_workers_are_capped_by_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(dataset_module.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert loader_workers(8) == 2  # the shipped configs' 8 on a 2-CPU machine
    assert loader_workers(1) == 1 and loader_workers(0) == 0  # 0: crops in the main process, as asked
    assert loader_workers(8, processes_per_node=2) == 1  # two ranks share the node's CPUs
    assert loader_workers(8, processes_per_node=4) == 1  # never fewer than one worker when workers were asked for
    monkeypatch.setattr(dataset_module.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert loader_workers(8) == 8 and loader_workers(8, processes_per_node=4) == 8  # the config is the cap
