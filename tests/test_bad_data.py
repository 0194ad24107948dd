"""What is bad data (recorded, skipped) and what stops the run: full disks, memory errors and bugs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from child_processes import run_command
from volpre.cli import main
from volpre.config import DataConfig, PreprocessConfig
from volpre.data import cache as cache_module
from volpre.data import dicom as dicom_module
from volpre.data.dataset import BadEntryLog, PretrainDataset, VolumeGroups
from volpre.data.errors import as_bad_data
from volpre.data.dicom import scan_dicom
from volpre.demo.dicom_writer import SeriesTags, write_dicom_series
from volpre.data.errors import CacheError, VolumeError
from volpre.data.manifest import ManifestEntry

REPO = Path(__file__).parent.parent
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1",
                  "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _ct_manifest(demo_manifest: Path, path: Path, extra: tuple[dict, ...] = ()) -> Path:
    """The demo's CT NIfTI/NRRD/MetaImage entries (absolute paths), plus ``extra``."""
    data = json.loads(demo_manifest.read_text())
    base = demo_manifest.parent
    entries = [{**e, "image": str(base / e["image"]), "label": str(base / e["label"])} for e in data["entries"]
               if e["modality"] == "CT" and Path(e["image"]).suffix in (".gz", ".nrrd", ".mha")]
    path.write_text(json.dumps({"format_version": 1, "entries": list(extra) + entries}))
    return path


def _chained(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


# ----------------------------------------------------------------------------- the rule


def test_only_volume_errors_and_source_read_errors_are_bad_data():
    bad = VolumeError("/d/a.nii.gz", "truncated", "ends early")
    assert as_bad_data(bad, "/d/a.nii.gz") is bad
    wrapped = _chained(RuntimeError("applying transform <LoadVolumed>"), bad)  # as MONAI wraps it
    assert as_bad_data(wrapped, "/d/a.nii.gz") is bad
    unreadable = as_bad_data(PermissionError(errno.EACCES, "Permission denied", "/d/b.nrrd"), "/d/b")
    assert (unreadable.path, unreadable.kind, unreadable.reason) == ("/d/b.nrrd", "unreadable",
                                                                       "cannot be read: Permission denied")
    for error in (
        CacheError("cannot write cache entry"),
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        OSError(errno.EROFS, "Read-only file system"),
        MemoryError(),
        _chained(RuntimeError("applying transform"), MemoryError()),
        _chained(VolumeError("/d/a", "unreadable", "not a readable NIfTI file"), MemoryError()),  # a reader's wrap
        TypeError("unsupported operand"),
        _chained(RuntimeError("applying transform"), TypeError("a bug")),
        KeyError("image"),
    ):
        assert as_bad_data(error, "/d/a") is None, error


# ----------------------------------------------------------------------------- full disks


def _full_disk_open(real_open=open):
    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    return full_disk


def test_full_cache_disk_stops_cache_and_pretrain_with_one_line(demo_manifest, tmp_path, monkeypatch, capsys):
    manifest = _ct_manifest(demo_manifest, tmp_path / "m.json")
    monkeypatch.setattr(cache_module, "open", _full_disk_open(), raising=False)  # forked workers inherit it
    cache_dir = tmp_path / "cache"
    assert main(["cache", str(manifest), "--config", "resnet-dae-tiny", "--workers", "1",
                 f"data.cache_dir={cache_dir}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, (out, err)
    assert err.startswith("volpre cache: error: cannot write cache entry ") and err.endswith(
        ": No space left on device (the disk is full; free space there or write elsewhere); data.cache_dir sets "
        "where the cache goes\n")
    assert [p.name for p in cache_dir.rglob("*") if p.is_file()] == []  # no temporary left behind

    run = tmp_path / "run"
    assert main(["pretrain", "--config", "resnet-dae-tiny", "--manifest", str(manifest), "--output", str(run),
                 "--device", "cpu", "--max-steps", "2", "data.num_workers=1", f"data.cache_dir={cache_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("volpre pretrain: error: cannot write cache entry "), err
    assert "No space left on device (the disk is full" in err
    assert not (run / "bad_entries.jsonl").exists() and not (run / "checkpoints").exists()


def _can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    where.mkdir()
    probe = run_command(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"], timeout=60)
    return probe.returncode == 0


def test_cache_on_a_real_full_tmpfs_stops_with_one_line_and_no_segfault(demo_manifest, tmp_path):
    """The issue's repro: a tiny tmpfs as data.cache_dir (HDF5 crashed at exit on files it could not close)."""
    where = tmp_path / "tiny"
    if not _can_mount_tmpfs(where):
        pytest.skip("cannot mount a tmpfs here (needs unshare and user namespaces)")
    manifest = _ct_manifest(demo_manifest, tmp_path / "m.json")
    command = (f"mount -t tmpfs -o size=64k tmpfs {where} && exec {sys.executable} -m volpre cache {manifest} "
               f"--config resnet-dae-tiny --workers 2 data.cache_dir={where} preprocess.spacing=[1.5,1.5,1.5]")
    proc = run_command(["unshare", "-rm", "sh", "-c", command], timeout=600, env=SUBPROCESS_ENV)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("volpre cache: error: cannot write cache entry "), proc.stderr
    assert "No space left on device (the disk is full" in lines[0]


# ----------------------------------------------------------------------------- bugs are not bad data


def test_type_error_in_crop_cutting_stops_the_run_with_its_traceback(demo_manifest, tmp_path, monkeypatch):
    manifest = _ct_manifest(demo_manifest, tmp_path / "m.json")

    def buggy_read_crop(*args, **kwargs):
        raise TypeError("injected bug in crop cutting")

    monkeypatch.setattr(cache_module, "read_crop", buggy_read_crop)
    run = tmp_path / "run"
    args = ["pretrain", "--config", "resnet-dae-tiny", "--manifest", str(manifest), "--output", str(run),
            "--device", "cpu", "--max-steps", "2", "data.num_workers=1",
            f"data.cache_dir={demo_manifest.parent / '.volpre_cache'}"]
    with pytest.raises(TypeError, match="injected bug in crop cutting") as info:
        main(args)  # not a user error: the CLI lets the traceback through
    assert "buggy_read_crop" in str(info.value)  # the worker's traceback is in the message
    assert not (run / "bad_entries.jsonl").exists()


def test_type_error_while_building_the_cache_stops_volpre_cache(demo_manifest, tmp_path, monkeypatch):
    manifest = _ct_manifest(demo_manifest, tmp_path / "m.json")

    def buggy_to_storage(*args, **kwargs):
        raise TypeError("injected bug in the cache builder")

    monkeypatch.setattr(cache_module, "to_storage", buggy_to_storage)
    with pytest.raises(TypeError, match="injected bug in the cache builder"):
        main(["cache", str(manifest), "--config", "resnet-dae-tiny", "--workers", "0",
              f"data.cache_dir={tmp_path / 'cache'}"])


def test_bug_in_dicom_parsing_is_raised_and_bad_values_are_skipped(tmp_path, monkeypatch):
    volume = np.random.default_rng(0).integers(-1000, 1000, size=(8, 8, 4)).astype(np.float32)
    paths = write_dicom_series(volume, np.diag([0.8, 0.8, 2.0, 1.0]), tmp_path, SeriesTags("CT", "p1"))
    import pydicom

    ds = pydicom.dcmread(paths[1])
    ds.ImagePositionPatient = [0.0, 1.0]  # two numbers where three belong
    ds.save_as(paths[1])
    scan = scan_dicom(paths)
    (skipped,) = scan.skipped
    assert skipped.path == paths[1] and skipped.kind == "unreadable"
    assert skipped.reason == "unreadable DICOM header: ImagePositionPatient holds [0.0, 1.0]; expected 3 finite numbers"

    def buggy_make_slice(*args, **kwargs):
        raise TypeError("injected bug in DICOM parsing")

    monkeypatch.setattr(dicom_module, "_make_slice", buggy_make_slice)
    with pytest.raises(TypeError, match="injected bug in DICOM parsing"):
        scan_dicom(paths)


# ----------------------------------------------------------------------------- counted once


def test_bad_entry_is_recorded_once_whatever_the_workers_ranks_and_resumes(tmp_path, caplog):
    good = tmp_path / "good.nii.gz"
    volume = np.full((24, 24, 16), -1000.0, np.float32)
    volume[4:-4, 4:-4, 2:-2] = 40.0
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), good)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(good.read_bytes()[:300])
    entries = [ManifestEntry(image=(broken,), id="broken", modality="CT"),
               ManifestEntry(image=(good,), id="good", modality="CT")]
    groups = VolumeGroups.build(entries, by_subject=False)
    pre, data = PreprocessConfig(spacing=(4.0, 4.0, 4.0)), DataConfig(roi=(16, 16, 16), crops_per_volume=1)
    path = tmp_path / "bad_entries.jsonl"
    # one dataset per worker, rank and invocation: each meets the broken entry itself
    for _process in range(4):
        dataset = PretrainDataset(groups, pre, data, seed=0, bad_entries=BadEntryLog(path))
        assert len(dataset[(0, 0)]) == 1  # replaced by the good entry
        assert len(dataset[(1, 0)]) == 1
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["id"] == "broken"
    assert json.loads(lines[0])["kind"] == "truncated"
    assert caplog.text.count("skipping entry broken") == 1
    assert [r["id"] for r in BadEntryLog(path).read()] == ["broken"]
