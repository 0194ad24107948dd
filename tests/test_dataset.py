"""The pretraining crop stream (volpre.data.dataset): items, bad entries, subjects, sharding, workers."""

from __future__ import annotations

import json

import pytest
import torch

from phantom_files import write_phantom_files
from volpre.config import DataConfig, PreprocessConfig
from volpre.data import dataset as dataset_module
from volpre.data.dataset import (BadEntryLog, InfiniteShardSampler, PretrainDataset, VolumeGroups, item_seed,
                                 loader_workers)
from volpre.data.errors import VolumeError
from volpre.data.manifest import ManifestEntry
from volpre.data.transforms import CROP_DTYPE


@pytest.fixture
def files(tmp_path):
    return write_phantom_files(tmp_path)


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
    assert len(a) == 2 and a[0]["image"].shape == (1, 16, 16, 16) and a[0]["image"].dtype == CROP_DTYPE
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
