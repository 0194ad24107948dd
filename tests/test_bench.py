"""The benchmarks run end to end on tiny data and report what they promise (never how fast)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from volpre.bench.data import PIPELINES, BenchError, bench_entries, run_data_bench
from volpre.bench.isolated import run_isolated
from volpre.bench.step import PHASES, run_step_bench
from volpre.bench.volumes import write_bench_ct
from volpre.cli import main
from volpre.config import load_config
from volpre.data.manifest import Manifest, ManifestEntry, load_manifest, save_manifest

TINY = ["preprocess.spacing=[6.0,6.0,6.0]"]


def test_bench_data_measures_every_pipeline_and_writes_json(demo_manifest, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "data", str(demo_manifest), "--roi", "16", "--workers", "1", "--min-seconds", "0.2",
            "--json", str(out), "--config", "swin-dae-tiny", *TINY]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[:3] == ["pipeline", "crops/s", "x"]
    assert "volpre cache: " in printed and "x the int16 size of the preprocessed voxels" in printed
    results = json.loads(out.read_text())
    used, _ = bench_entries(load_manifest(demo_manifest).entries)
    crops_per_pass = len(used) * 2  # swin-dae-tiny: 2 crops per volume
    for name in (*PIPELINES, "persistent_cold"):
        r = results[name]
        assert r["crops_per_s"] > 0 and r["seconds"] > 0 and r["passes"] >= 1
        assert r["crops"] == r["passes"] * crops_per_pass
        assert r["peak_rss_main_bytes"] > 0 and r["peak_rss_worker_bytes"] > 0
    assert results["volpre_cold"]["passes"] == results["persistent_cold"]["passes"] == 1
    assert results["reference"]["cache_bytes"] == 0 < results["persistent"]["cache_bytes"]
    assert results["cache_bytes"] == results["volpre_warm"]["cache_bytes"] > 0
    assert results["int16_bytes"] > 0
    assert results["setup"]["entries"] == len(used) and results["setup"]["roi"] == [16, 16, 16]


def test_bench_data_names_what_it_cannot_use(tmp_path, capsys):
    image = tmp_path / "mr.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), image)
    manifest = tmp_path / "m.json"
    save_manifest(Manifest(entries=[ManifestEntry(image=(image,), id="mr", modality="MR")]), manifest)
    with pytest.raises(BenchError, match=r"m\.json: no CT entry stored as one NIfTI file to benchmark \(1 other"):
        run_data_bench(manifest, load_config("swin-dae-tiny"), (16, 16, 16), 0, say=lambda _: None)
    assert main(["bench", "data", str(manifest), "--roi", "16", "--config", "swin-dae-tiny"]) == 2
    assert "no CT entry stored as one NIfTI file" in capsys.readouterr().err
    assert main(["bench", "data", str(manifest), "--roi", "16,0,16", "--config", "swin-dae-tiny"]) == 2
    assert "--roi takes one edge or three comma-separated sizes, all >= 1" in capsys.readouterr().err
    assert main(["bench", "data", str(manifest), "--roi", "16", "--pipelines", "reference,fast"]) == 2
    assert "--pipelines: unknown pipeline 'fast'; choose from reference, persistent" in capsys.readouterr().err


def test_bench_ct_volumes_are_deterministic_and_entries_cycle_over_files(tmp_path):
    small = {"volumes": 2, "entries": 5, "shape": (24, 20, 16), "spacing": (18.0, 18.0, 20.0), "seed": 3}
    first, second = write_bench_ct(tmp_path / "a", **small), write_bench_ct(tmp_path / "b", **small)
    for name in ("ct0000.nii.gz", "ct0001.nii.gz"):
        assert (first.parent / "images" / name).read_bytes() == (second.parent / "images" / name).read_bytes()
    entries = load_manifest(first).entries
    assert [e.image[0].name for e in entries] == ["ct0000.nii.gz", "ct0001.nii.gz"] * 2 + ["ct0000.nii.gz"]
    assert len({e.id for e in entries}) == 5 and {e.modality for e in entries} == {"CT"}
    image = nib.load(entries[1].image[0])
    data = np.asanyarray(image.dataobj)
    assert image.shape == (24, 20, 16) and data.dtype == np.int16
    np.testing.assert_allclose(image.header.get_zooms(), (18.0, 18.0, 20.0))
    assert data.min() >= -1024 and data.max() <= 3071 and data.min() < -900 < 0 < data.max()  # air and tissue
    with pytest.raises(FileExistsError, match=r"exists and is not an empty folder"):
        write_bench_ct(tmp_path / "a", volumes=1)


def test_bench_step_times_every_phase(demo_manifest, tmp_path):
    cfg = load_config("resnet-dae-tiny", ["data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}"])
    result = run_step_bench(cfg, demo_manifest, steps=2, warmup=1, device="cpu", say=lambda _: None)
    assert set(result["phases"]) == set(PHASES)
    assert sum(p["fraction"] for p in result["phases"].values()) == pytest.approx(1.0)
    assert all(p["s"] >= 0 for p in result["phases"].values())
    assert result["samples_per_step"] == cfg.data.batch_size * cfg.data.crops_per_volume
    assert result["samples_per_s"] > 0 and result["data_wait_fraction"] == result["phases"]["data_wait"]["fraction"]
    assert any((tmp_path / "cache").rglob("*.h5"))  # the steps read a warm cache


def test_failing_benchmark_process_reports_its_error(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(RuntimeError, match=r"benchmark step write_bench_ct failed: FileExistsError: .*taken exists"):
        run_isolated(write_bench_ct, tmp_path / "taken", 1)
