"""The preprocessed-volume cache: same crops as the presets, invalidation, concurrency, corruption;
and the faster gzip decoder of the readers."""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import subprocess
import time
from pathlib import Path
import zlib

import h5py
import nibabel as nib
import numpy as np
import pydicom.data
import pytest
import SimpleITK as sitk
import torch
from monai.data import list_data_collate

from child_processes import SPAWN, join_or_kill, spawned
from volpre.cli import main
from volpre.config import ConfigError, DataConfig, PreprocessConfig
from volpre.data import cache as cache_module
from volpre.data.cache import (
    CACHE_FORMAT,
    CacheError,
    CachedCrops,
    VolumeCache,
    cache_dir_for,
    entries_to_cache,
    read_crop,
    source_files,
    to_storage,
    voxels_crc32,
)
from volpre.data.dataset import BadEntryLog, OnTheFlyCrops, PretrainDataset, VolumeGroups
from volpre.data.errors import VolumeError
from volpre.data.manifest import Manifest, ManifestEntry, save_manifest
from volpre.data.readers import gunzip
from volpre.data.transforms import CROP_DTYPE, crops_at, draw_crop_starts

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
PRE = PreprocessConfig(spacing=(4.0, 4.0, 3.0))
CT_TOLERANCE_HU = 1.0 + 1e-6
"""Crops are float16 HU: the cache's int16 rounding (<= 0.5 HU) plus float16's of the on-the-fly
crop's float32 HU (<= 0.5 HU below 2048 HU)."""


def _ct_volume(seed: int = 0, shape=(40, 36, 24)) -> np.ndarray:
    """Air around a noisy soft-tissue box holding a bright block (float HU)."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0, np.float32)
    hu[6:-6, 6:-6, 3:-3] = 40.0
    hu[15:25, 15:25, 8:16] = 700.0
    return hu + rng.normal(0, 15, shape).astype(np.float32)


def _mr_volume(seed: int = 0, shape=(32, 32, 20)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mr = rng.uniform(0, 5, shape).astype(np.float32)
    mr[6:-6, 6:-6, 4:-4] = rng.normal(400, 60, (shape[0] - 12, shape[1] - 12, shape[2] - 8))
    return mr


@pytest.fixture
def files(tmp_path):
    nib.save(nib.Nifti1Image(_ct_volume(0), AFFINE), tmp_path / "ct_a.nii.gz")
    nib.save(nib.Nifti1Image(_ct_volume(1), AFFINE), tmp_path / "ct_b.nii.gz")
    nib.save(nib.Nifti1Image(_mr_volume(0), AFFINE), tmp_path / "mr.nii.gz")
    return tmp_path


def _entry(path, entry_id=None, modality="CT") -> ManifestEntry:
    return ManifestEntry(image=(path,), id=entry_id or path.name, modality=modality)


def _assert_close(cached, reference, modality):
    assert len(cached) == len(reference)
    for a, b in zip(cached, reference):
        assert type(a) is type(b) is torch.Tensor  # plain tensors: CT and MR crops collate together
        assert a.dtype == b.dtype == CROP_DTYPE and a.shape == b.shape
        if modality == "CT":
            assert float((a.float() - b.float()).abs().max()) <= CT_TOLERANCE_HU
        else:  # float16 storage: relative rounding 2^-11
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2.0**-11, atol=1e-7)


# ----------------------------------------------------------------------------- same crops


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_read_crop_equals_monai_pad_then_crop(modality):
    """The hand-written region read + padding against the presets' MONAI SpatialPadd and a slice."""
    rng = np.random.default_rng(3)
    pre = PreprocessConfig(ct_window=(-300.0, 500.0))
    for trial in range(40):
        shape = tuple(int(s) for s in rng.integers(3, 30, size=3))
        roi = tuple(int(r) for r in rng.integers(2, 34, size=3))
        channels = int(rng.integers(1, 3))
        if modality == "CT":
            stored = rng.integers(-1200, 1500, size=(channels, *shape)).astype(np.int16)
        else:
            stored = rng.normal(0, 2, size=(channels, *shape)).astype(np.float16)
        data = DataConfig(roi=roi, crops_per_volume=3)
        starts = draw_crop_starts(shape, roi, 3, rng)
        reference = crops_at(torch.from_numpy(stored.astype(np.float32)), starts, pre, data, modality)
        for start, expected in zip(starts, reference):
            got = read_crop(stored, start, roi, modality, pre)
            assert got.shape == (channels, *roi), (trial, shape, roi)
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"trial {trial}: {shape} roi {roi}")


@pytest.mark.parametrize(("name", "modality", "roi"), [
    ("ct_a.nii.gz", "CT", (16, 16, 32)),  # preprocessed 18 x 16 x 22: random in x, exact in y, padded in z
    ("mr.nii.gz", "MR", (32, 16, 8)),  # 24 x 24 x 16 (after the MR crop): padded in x (replicated border)
])
def test_cached_crops_equal_the_crops_of_the_fully_preprocessed_volume(files, tmp_path, name, modality, roi):
    entry = _entry(files / name, modality=modality)
    data = DataConfig(roi=roi, crops_per_volume=3)
    cache = VolumeCache.create(tmp_path / "cache", PRE)
    on_the_fly, cached = OnTheFlyCrops(PRE, data), CachedCrops(cache, data)
    for seed in range(4):  # seed 0 builds the entry (crops cut in memory); later seeds read the file
        reference = on_the_fly(entry, 3, np.random.default_rng(seed))
        _assert_close(cached(entry, 3, np.random.default_rng(seed)), reference, modality)
    fresh = CachedCrops(VolumeCache.create(tmp_path / "cache", PRE), data)  # another process: reads only
    _assert_close(fresh(entry, 3, np.random.default_rng(9)), on_the_fly(entry, 3, np.random.default_rng(9)), modality)


def test_entry_file_holds_rounded_voxels_contiguously_with_their_checksum_and_its_record(files, tmp_path):
    ct, mr = _entry(files / "ct_a.nii.gz"), _entry(files / "mr.nii.gz", modality="MR")
    cache = VolumeCache.create(tmp_path / "cache", PRE)
    for entry, dtype in ((ct, np.int16), (mr, np.float16)):
        status = cache.ensure(entry)
        assert status.built and status.reason == "missing"
        with h5py.File(status.path, "r") as f:
            image = f["image"]
            assert image.dtype == dtype and image.chunks is None and image.compression is None
            record = json.loads(f.attrs["volpre_cache"])
            assert record["format"] == CACHE_FORMAT
            assert record["voxels_crc32"] == zlib.crc32(np.ascontiguousarray(image[...]).tobytes())
            voxel_bytes = image.size * image.dtype.itemsize
        assert status.path.stat().st_size < voxel_bytes + 16384  # the voxels' own bytes and a little metadata
        assert record["config_hash"] == cache.config_hash and record["dtype"] == np.dtype(dtype).name
        assert record["entry"] == {"image": [str(entry.image[0])], "series_uid": None, "modality": entry.modality}
        assert [s["path"] for s in record["source"]] == [str(entry.image[0])]
        assert status.path.parent == tmp_path / "cache" / cache.config_hash
        assert status.path.name.startswith(entry.image[0].name)
    with cache.load(ct) as stored:
        assert not stored.built
        assert stored.image.dtype == np.int16 and stored.shape[0] == 1


def test_entries_naming_the_same_files_share_one_cache_entry(files, tmp_path):
    cache = VolumeCache(tmp_path, PRE)
    a, b = _entry(files / "ct_a.nii.gz", "id-1"), _entry(files / "ct_a.nii.gz", "id-2")
    other = _entry(files / "ct_b.nii.gz", "id-3")
    assert cache.entry_path(a) == cache.entry_path(b) != cache.entry_path(other)
    assert [e.id for e in entries_to_cache([a, b, other, a])] == ["id-1", "id-3"]


def test_pretrain_dataset_on_the_cache_is_pure_and_replaces_bad_entries(files, tmp_path):
    broken = files / "broken.nii.gz"
    broken.write_bytes((files / "ct_a.nii.gz").read_bytes()[:2000])
    entries = [_entry(files / "ct_a.nii.gz"), _entry(broken), _entry(files / "ct_b.nii.gz")]
    data = DataConfig(roi=(16, 16, 16), crops_per_volume=2)
    groups = VolumeGroups.build(entries, by_subject=False)
    log = BadEntryLog(tmp_path / "bad.jsonl")
    cached = PretrainDataset(groups, PRE, data, seed=5, bad_entries=log,
                             crops=CachedCrops(VolumeCache.create(tmp_path / "cache", PRE), data))
    plain = PretrainDataset(groups, PRE, data, seed=5)
    first, again = cached[(0, 0)], cached[(0, 0)]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(first, again))
    _assert_close([c["image"] for c in first], [c["image"] for c in plain[(0, 0)]], "CT")
    replaced = cached[(0, 1)]  # the broken entry: recorded, replaced by the next item
    _assert_close([c["image"] for c in replaced], [c["image"] for c in plain[(0, 2)]], "CT")
    assert [(r["id"], r["kind"]) for r in log.read()] == [("broken.nii.gz", "truncated")]
    both = [_entry(files / "ct_b.nii.gz"), _entry(files / "mr.nii.gz", modality="MR")]
    mixed = PretrainDataset(VolumeGroups.build(both, by_subject=False), PRE, data, seed=5,
                            crops=CachedCrops(VolumeCache.create(tmp_path / "cache", PRE), data))
    batch = list_data_collate([mixed[(0, 0)], mixed[(0, 1)]])  # a CT and an MR item in one batch
    assert batch["image"].shape == (4, 1, 16, 16, 16)
    assert mixed.groups.modality_classes == ("CT", "MR")
    assert batch["modality"].tolist() == [0, 0, 1, 1] and batch["modality"].dtype == torch.int64


# ----------------------------------------------------------------------------- invalidation


def test_changed_source_invalidates_only_its_entry(files, tmp_path):
    a, b = _entry(files / "ct_a.nii.gz"), _entry(files / "ct_b.nii.gz")
    VolumeCache.create(tmp_path / "cache", PRE).ensure(a)
    VolumeCache.create(tmp_path / "cache", PRE).ensure(b)
    nib.save(nib.Nifti1Image(_ct_volume(7), AFFINE), files / "ct_a.nii.gz")
    stat = (files / "ct_a.nii.gz").stat()
    os.utime(files / "ct_a.nii.gz", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    cache = VolumeCache.create(tmp_path / "cache", PRE)  # a new process
    status_a, status_b = cache.ensure(a), cache.ensure(b)
    assert status_a.built and status_a.reason.startswith(f"stale: source file {files / 'ct_a.nii.gz'} changed (")
    assert "mtime_ns" in status_a.reason
    assert not status_b.built and status_b.reason == "up to date"
    data = DataConfig(roi=(16, 16, 16), crops_per_volume=2)
    _assert_close(CachedCrops(cache, data)(a, 2, np.random.default_rng(0)),
                  OnTheFlyCrops(PRE, data)(a, 2, np.random.default_rng(0)), "CT")


def test_changed_config_uses_a_new_entry_and_keeps_the_old_one(files, tmp_path):
    entry = _entry(files / "ct_a.nii.gz")
    first = VolumeCache.create(tmp_path / "cache", PRE)
    first.ensure(entry)
    other = VolumeCache.create(tmp_path / "cache", PreprocessConfig(spacing=(6.0, 6.0, 6.0)))
    assert other.directory != first.directory
    status = other.ensure(entry)
    assert status.built and status.reason == "missing"
    assert VolumeCache.create(tmp_path / "cache", PRE).ensure(entry).reason == "up to date"


def test_entry_of_another_volpre_version_is_rebuilt(files, tmp_path, monkeypatch):
    entry = _entry(files / "ct_a.nii.gz")
    VolumeCache.create(tmp_path / "cache", PRE).ensure(entry)
    monkeypatch.setattr(cache_module, "__version__", "99.0")
    status = VolumeCache.create(tmp_path / "cache", PRE).ensure(entry)
    assert status.built and status.reason == "stale: built with volpre '0.1.0', now '99.0'"


def test_source_files_of_a_dicom_series_folder_and_a_detached_header(tmp_path):
    folder = os.path.join(os.path.dirname(pydicom.data.get_testdata_file("CT_small.dcm")), "dicomdirtests",
                          "98892001", "CT5N")
    listed = source_files(folder)
    assert len(listed) == 5 and all(p.is_file() for p in listed) and listed == sorted(listed)
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))
    sitk.WriteImage(image, str(tmp_path / "vol.mhd"))
    assert [p.name for p in source_files(tmp_path / "vol.mhd")] == ["vol.mhd", "vol.raw"]


# ----------------------------------------------------------------------------- concurrency


def _build_after_barrier(root, entry, barrier) -> None:
    barrier.wait(timeout=60)
    VolumeCache(root, PRE).build(entry).close()


def test_two_processes_building_the_same_entry_leave_one_valid_entry(files, tmp_path):
    entry = _entry(files / "ct_a.nii.gz")
    root = tmp_path / "cache"
    VolumeCache.create(root, PRE)
    # spawned, not forked: a child forked after torch started its thread pools can deadlock in
    # its first parallel op (seen here in MONAI Spacing's affine_grid)
    barrier = SPAWN.Barrier(2)
    workers = [SPAWN.Process(target=_build_after_barrier, args=(root, entry, barrier)) for _ in range(2)]
    with spawned(workers):
        assert join_or_kill(workers, timeout=240) == [0, 0]
    leftovers = sorted(p.name for p in (root / VolumeCache(root, PRE).config_hash).iterdir())
    assert leftovers == [VolumeCache(root, PRE).entry_path(entry).name]  # no temporary file, one entry
    status = VolumeCache(root, PRE).ensure(entry)
    assert not status.built and status.reason == "up to date"


def test_stale_temporary_files_are_removed(tmp_path):
    cache = VolumeCache.create(tmp_path, PRE)
    old, new = cache.directory / "x.h5.host.1.ab.tmp", cache.directory / "y.h5.host.2.cd.tmp"
    old.write_bytes(b"partial")
    new.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    assert cache.remove_stale_temporaries() == 1
    assert not old.exists() and new.exists()


# ----------------------------------------------------------------------------- corruption


def _flip_one_voxel_byte(path) -> None:
    with h5py.File(path, "r") as f:
        image = f["image"]
        offset = image.id.get_offset() + image.size * image.dtype.itemsize // 2
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_corrupt_voxels_are_detected_before_a_crop_is_cut_and_rebuilt(files, tmp_path, caplog):
    entry = _entry(files / "ct_a.nii.gz")
    data = DataConfig(roi=(8, 8, 8), crops_per_volume=2)  # crops that need not touch the damaged voxel
    path = VolumeCache.create(tmp_path / "cache", PRE).ensure(entry).path
    _flip_one_voxel_byte(path)
    with h5py.File(path, "r") as f:
        f["image"][...]  # HDF5 itself reads damaged voxels without a word
    cached = CachedCrops(VolumeCache.create(tmp_path / "cache", PRE), data)
    with caplog.at_level(logging.WARNING, logger="volpre.data.cache"):
        crops = cached(entry, 2, np.random.default_rng(1))
    assert (f"cache entry {path} for {entry.id} is corrupt: {path.name}: its voxels do not match their checksum"
            in caplog.text)
    _assert_close(crops, OnTheFlyCrops(PRE, data)(entry, 2, np.random.default_rng(1)), "CT")
    assert VolumeCache.create(tmp_path / "cache", PRE).ensure(entry).reason == "up to date"


def test_voxel_checksum_reads_in_slabs_and_equals_zlib_over_the_c_order_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "CRC_SLAB_BYTES", 1000)  # many slabs, one of them short
    voxels = np.random.default_rng(0).integers(-1024, 3071, size=(2, 37, 9, 7)).astype(np.int16)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("image", data=voxels)
        assert voxels_crc32(f["image"]) == voxels_crc32(voxels) == zlib.crc32(voxels.tobytes())
    assert voxels_crc32(voxels[:1].astype(np.float16)) == zlib.crc32(voxels[:1].astype(np.float16).tobytes())


def test_ensure_rechecks_an_entry_this_process_validated_before(files, tmp_path):
    entry = _entry(files / "ct_a.nii.gz")
    cache = VolumeCache.create(tmp_path / "cache", PRE)
    path = cache.ensure(entry).path
    with cache.load(entry):
        pass  # validated in this process
    _flip_one_voxel_byte(path)
    assert cache.ensure(entry).reason.startswith(f"corrupt: {path.name}: its voxels do not match")
    assert cache.ensure(entry).reason == "up to date"


def test_entry_of_the_earlier_compressed_layout_is_rebuilt_never_read(files, tmp_path):
    entry = _entry(files / "ct_a.nii.gz")
    cache = VolumeCache.create(tmp_path / "cache", PRE)
    path = cache.ensure(entry).path
    with h5py.File(path, "r") as f:
        voxels, record = f["image"][...], json.loads(f.attrs["volpre_cache"])
    old = {key: value for key, value in record.items() if key != "voxels_crc32"} | {"format": 1}
    with h5py.File(path, "w") as f:  # what volpre 0.x wrote: LZF chunks, no voxel checksum
        f.create_dataset("image", data=voxels + 7, chunks=(1, 8, 8, 8), compression="lzf", shuffle=True,
                         fletcher32=True)
        f.attrs["volpre_cache"] = json.dumps(old)
    status = VolumeCache.create(tmp_path / "cache", PRE).ensure(entry)
    assert status.built and status.reason == f"stale: built with format 1, now {CACHE_FORMAT}"
    with h5py.File(path, "r") as f:
        assert f["image"].chunks is None and np.array_equal(f["image"][...], voxels)


def test_truncated_or_overwritten_entry_is_rebuilt(files, tmp_path, caplog):
    entry = _entry(files / "ct_a.nii.gz")
    path = VolumeCache.create(tmp_path / "cache", PRE).ensure(entry).path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="volpre.data.cache"):
        status = VolumeCache.create(tmp_path / "cache", PRE).ensure(entry)
    assert status.built and status.reason.startswith(f"corrupt: {path.name} does not open as HDF5 (")
    assert "is corrupt" in caplog.text
    path.write_bytes(b"\0" * 4096)
    assert VolumeCache.create(tmp_path / "cache", PRE).ensure(entry).reason.startswith("corrupt: ")
    assert VolumeCache.create(tmp_path / "cache", PRE).ensure(entry).reason == "up to date"


# ----------------------------------------------------------------------------- errors


def test_unwritable_cache_folder_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(CacheError, match=r"data\.cache_dir: cannot write the cache folder .*a_file/[0-9a-f]{16}: "):
        VolumeCache.create(blocker, PRE)


def test_ct_window_must_fit_int16(tmp_path):
    window = r"preprocess\.ct_window \[-40000\.0, 1000\.0\] must lie within \[-32768, 32767\]"
    with pytest.raises(ConfigError, match=window):
        VolumeCache.create(tmp_path, PreprocessConfig(ct_window=(-40000.0, 1000.0)))


def test_mr_beyond_float16_is_a_volume_error():
    with pytest.raises(VolumeError, match=r"mr\.nii: preprocessed MR value 1e\+06 exceeds float16's range"):
        to_storage(np.array([[[[1e6]]]], np.float32), "MR", "mr.nii")
    assert to_storage(np.array([[[[-0.6, 0.4, 1e6]]]], np.float32), "CT", "ct").tolist() == [[[[-1, 0, 32767]]]]


def test_default_cache_folder_sits_beside_the_manifest(tmp_path):
    assert cache_dir_for(DataConfig(), tmp_path / "m.json") == tmp_path.resolve() / ".volpre_cache"
    assert cache_dir_for(DataConfig(cache_dir=str(tmp_path / "c")), tmp_path / "m.json") == tmp_path / "c"


# ----------------------------------------------------------------------------- command


def test_cache_command_builds_then_finds_entries_up_to_date(files, tmp_path, capsys):
    broken = files / "broken.nii.gz"
    broken.write_bytes((files / "ct_a.nii.gz").read_bytes()[:2000])
    entries = [_entry(files / "ct_a.nii.gz", "a"), _entry(files / "ct_a.nii.gz", "a-again"),
               _entry(files / "mr.nii.gz", "m", modality="MR"), _entry(broken, "bad")]
    manifest = tmp_path / "m.json"
    save_manifest(Manifest(entries=entries), manifest)
    config = tmp_path / "run.yaml"
    config.write_text("base: swin-dae-tiny\npreprocess:\n  spacing: [4.0, 4.0, 3.0]\n")
    argv = ["cache", str(manifest), "--config", str(config), "--workers", "0", f"data.cache_dir={tmp_path / 'c'}"]
    assert main(argv) == 1  # one entry is bad
    out = capsys.readouterr().out
    assert f"bad: {broken}: truncated: compressed pixel data ends early" in out
    assert "3 sources (4 entries): 2 built, 0 up to date, 1 failed" in out
    assert main(argv) == 1
    assert "3 sources (4 entries): 0 built, 2 up to date, 1 failed" in capsys.readouterr().out


# ----------------------------------------------------------------------------- decoding


def test_gunzip_decodes_every_member_and_fails_like_the_standard_library(tmp_path):
    payload = np.random.default_rng(0).integers(0, 255, 200_000, dtype=np.uint8).tobytes()
    stream = gzip.compress(payload[:120_000]) + gzip.compress(payload[120_000:])
    assert gunzip(stream) == payload
    damaged = {
        "truncated": stream[: len(stream) // 3],
        "bad crc": stream[:-8] + bytes([stream[-8] ^ 1]) + stream[-7:],
        "bad deflate data": stream[:500] + bytes([stream[500] ^ 0xFF]) + stream[501:],
        "trailing garbage": stream + b"garbage",
    }
    for name, data in damaged.items():
        with pytest.raises((EOFError, gzip.BadGzipFile, zlib.error)) as ours:
            gunzip(data)
        with pytest.raises((EOFError, gzip.BadGzipFile, zlib.error)) as reference:
            gzip.decompress(data)
        assert type(ours.value) is type(reference.value), name


# ----------------------------------------------------------------------------- many ranks (torchrun, SLURM)


def _cache_manifest(files, tmp_path, n: int = 5) -> tuple[Path, list[ManifestEntry]]:
    sources = [files / "ct_a.nii.gz", files / "ct_b.nii.gz", files / "mr.nii.gz"]
    entries = []
    for i in range(n):
        copy = files / f"src{i}.nii.gz"
        copy.write_bytes(sources[i % 3].read_bytes())
        entries.append(_entry(copy, f"e{i}", modality="MR" if i % 3 == 2 else "CT"))
    manifest = tmp_path / "m.json"
    save_manifest(Manifest(entries=entries), manifest)
    return manifest, entries


def _cache_command(manifest: Path, cache_dir: Path) -> list[str]:
    return ["-m", "volpre", "cache", str(manifest), "--config", "swin-dae-tiny", "--workers", "0",
            "preprocess.spacing=[4.0,4.0,3.0]", f"data.cache_dir={cache_dir}"]


def _tiny_preprocess() -> PreprocessConfig:
    from volpre.config import load_config

    return load_config("swin-dae-tiny", ["preprocess.spacing=[4.0,4.0,3.0]"]).preprocess


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK") and
           not k.startswith("SLURM_")}
    return {**env, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **extra}


def _builders(cache_dir: Path, entries: list[ManifestEntry]) -> list[int]:
    """The pid that built each entry's cache file (from its record)."""
    cache = VolumeCache(cache_dir, _tiny_preprocess())
    pids = []
    for entry in entries:
        with h5py.File(cache.entry_path(entry), "r", locking=False) as f:
            pids.append(json.loads(f.attrs["volpre_cache"])["built_by"]["pid"])
    return pids


def test_shards_are_disjoint_and_cover_every_source(files):
    sources = [_entry(files / f"x{i}.nii.gz") for i in range(7)]
    shards = [cache_module.shard(sources, rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [3, 2, 2]
    assert sorted((e.id for s in shards for e in s), key=lambda i: int(i[1:-7])) == [e.id for e in sources]
    assert cache_module.shard(sources, 0, 1) == sources
    with pytest.raises(ValueError, match="rank 3 is not in 0..2"):
        cache_module.shard(sources, 3, 3)


def test_torchrun_ranks_build_each_entry_once_and_a_relaunch_builds_only_what_is_missing(files, tmp_path):
    import sys

    from child_processes import run_command

    manifest, entries = _cache_manifest(files, tmp_path)
    cache_dir = tmp_path / "cache"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = run_command(torchrun + _cache_command(manifest, cache_dir), timeout=300, env=_child_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("cache ")]
    assert len(summaries) == 1, proc.stdout  # one summary for all ranks
    assert summaries[0].endswith(": 5 sources (5 entries): 5 built, 0 up to date, 0 failed")
    pids = _builders(cache_dir, entries)
    assert len(set(pids)) == 2 and pids[0::2] == [pids[0]] * 3 and pids[1::2] == [pids[1]] * 2  # rank r: r, r+2, ...

    # a rank killed half way leaves some entries unbuilt and a temporary file: the relaunch builds just those
    cache = VolumeCache(cache_dir, _tiny_preprocess())
    for entry in (entries[1], entries[4]):
        cache.entry_path(entry).unlink()
    temporary = cache.directory / f"{cache.entry_path(entries[1]).name}.host.123.abcd.tmp"
    temporary.write_bytes(b"partial")
    proc = run_command(torchrun + _cache_command(manifest, cache_dir), timeout=300, env=_child_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith("cache ")][0].endswith(
        ": 5 sources (5 entries): 2 built, 3 up to date, 0 failed")
    again = _builders(cache_dir, entries)
    assert [again[i] for i in (0, 2, 3)] == [pids[i] for i in (0, 2, 3)]  # entries that were there: not rebuilt
    assert again[1] != pids[1] and again[4] != pids[4] and again[1] != again[4]  # rebuilt, each by its own rank
    assert temporary.exists()  # a fresh temporary may be another builder's: removed only once an hour old


def test_slurm_tasks_split_the_sources_like_torchrun_ranks(files, tmp_path):
    import socket
    import sys

    from child_processes import started_command

    manifest, entries = _cache_manifest(files, tmp_path, n=3)
    cache_dir = tmp_path / "cache"
    with socket.socket() as probe:  # ignite derives the rendezvous port from the job id: 15000 + id % 5000
        for port in range(15000 + os.getpid() % 4000, 20000):
            try:
                probe.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
    job = str(port - 15000 + 5000)
    outputs = [tmp_path / f"task{i}.out" for i in range(2)]
    with contextlib.ExitStack() as stack:
        procs = []
        for task, output in enumerate(outputs):
            env = _child_env(SLURM_JOB_ID=job, SLURM_PROCID=str(task), SLURM_LOCALID=str(task), SLURM_NTASKS="2",
                             SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost")
            handle = stack.enter_context(open(output, "w"))
            procs.append(stack.enter_context(started_command([sys.executable, *_cache_command(manifest, cache_dir)],
                                                             env=env, stdout=handle, stderr=subprocess.STDOUT)))
        codes = [proc.wait(timeout=300) for proc in procs]
    texts = [output.read_text() for output in outputs]
    assert codes == [0, 0], texts
    [summary] = [line for line in texts[0].splitlines() if line.startswith("cache ")]
    assert summary.endswith(": 3 sources (3 entries): 3 built, 0 up to date, 0 failed")
    assert not any(line.startswith("cache ") for line in texts[1].splitlines())  # task 1 prints no summary
    pids = _builders(cache_dir, entries)
    assert pids[0] == pids[2] != pids[1]
