"""The benchmarks run end to end on tiny data and report what they promise (never how fast)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volpre.bench.data import PIPELINES, bench_entries, run_data_bench
from volpre.bench.errors import BenchError
from volpre.bench.isolated import run_isolated
from volpre.bench.step import PHASES, run_step_bench
from volpre.bench.volumes import write_bench_ct
from volpre.cli import main
from volpre.config import load_config
from volpre.data.manifest import Manifest, ManifestEntry, load_manifest, save_manifest

TINY = ["preprocess.spacing=[6.0,6.0,6.0]"]


def test_bench_data_measures_every_pipeline_and_writes_json(demo_manifest, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "data", str(demo_manifest), "--roi", "16", "16", "16", "--workers", "1", "--min-seconds", "0.2",
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
    assert results["cache_bytes"] < results["int16_bytes"] + 16384 * results["setup"]["sources"]  # + metadata
    assert results["setup"]["entries"] == len(used) and results["setup"]["roi"] == [16, 16, 16]
    stages = results["volpre_warm"]["stages_ms_per_crop"]
    assert set(stages) == {"open", "read", "convert", "stages", "loader_other", "window_in_step"}
    assert all(value >= 0 for value in stages.values()) and stages["read"] > 0
    assert stages["stages"] == pytest.approx(sum(stages[k] for k in ("open", "read", "convert")), abs=2e-3)
    assert "volpre warm crop, ms per crop (one thread, as in a worker): open " in printed


def test_bench_data_names_what_it_cannot_use(tmp_path, capsys):
    image = tmp_path / "mr.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), image)
    manifest = tmp_path / "m.json"
    save_manifest(Manifest(entries=[ManifestEntry(image=(image,), id="mr", modality="MR")]), manifest)
    with pytest.raises(BenchError, match=r"m\.json: no CT entry stored as one NIfTI file to benchmark \(1 other"):
        run_data_bench(manifest, load_config("swin-dae-tiny"), (16, 16, 16), 0, say=lambda _: None)
    assert main(["bench", "data", str(manifest), "--roi", "16", "16", "16", "--config", "swin-dae-tiny"]) == 2
    assert "no CT entry stored as one NIfTI file" in capsys.readouterr().err
    assert main(["bench", "data", str(manifest), "--roi", "16", "0", "16", "--config", "swin-dae-tiny"]) == 2
    assert "--roi takes three sizes X Y Z, each >= 1 (e.g. 96 96 64), got 16 0 16" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # the comma spelling of other versions: X Y Z, as every 3-vector option
        main(["bench", "data", str(manifest), "--roi", "16,16,16", "--config", "swin-dae-tiny"])
    assert exit_.value.code == 2 and "argument --roi: expected 3 arguments" in capsys.readouterr().err
    assert main(["bench", "data", str(manifest), "--roi", "16", "16", "16", "--pipelines", "reference,fast"]) == 2
    assert "--pipelines: unknown pipeline 'fast'; choose from reference, persistent" in capsys.readouterr().err
    missing = tmp_path / "gone.nii.gz"
    save_manifest(Manifest(entries=[ManifestEntry(image=(missing,), id="ct-gone", modality="CT")]), manifest)
    assert main(["bench", "data", str(manifest), "--roi", "16", "16", "16", "--config", "swin-dae-tiny"]) == 2
    error = capsys.readouterr().err
    assert f"{missing}: no such file or directory (entry ct-gone; volpre check {manifest} lists every bad entry)" in error
    assert "Errno" not in error


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
    with pytest.raises(FileExistsError,
                       match=r"benchmark volumes output .* is a non-empty directory; expected a new or empty directory"):
        write_bench_ct(tmp_path / "a", volumes=1)


def _check_arm(arm: dict, samples_per_step: int) -> None:
    assert set(arm["phases"]) == set(PHASES)
    assert sum(p["fraction"] for p in arm["phases"].values()) == pytest.approx(1.0)
    assert all(p["s"] >= 0 for p in arm["phases"].values())
    assert arm["samples_per_step"] == samples_per_step
    assert arm["samples_per_s"] > 0 and arm["data_wait_fraction"] == arm["phases"]["data_wait"]["fraction"]
    assert arm["flops_per_sample"] > 1e6 and arm["parameters"] > 1000
    assert arm["peak_memory_bytes"] is None  # CUDA's allocator statistics only
    assert np.isfinite([arm["loss_first"], arm["loss_last"]]).all()


def test_bench_step_times_every_phase_of_the_trainers_step(demo_manifest, tmp_path, monkeypatch):
    from volpre.engine.trainer import Pretraining

    calls = []
    original = Pretraining.train_step
    monkeypatch.setattr(Pretraining, "train_step", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    cfg = load_config("resnet-dae-tiny", ["data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}"])
    result = run_step_bench(cfg, demo_manifest, steps=2, warmup=1, device="cpu", say=lambda _: None)
    assert len(calls) == 3  # the trainer's own step, warm-up included
    assert list(result["arms"]) == ["volpre"] and result["volpre_over_reference"] is None
    _check_arm(result["arms"]["volpre"], cfg.data.batch_size * cfg.data.crops_per_volume)
    assert any((tmp_path / "cache").rglob("*.h5"))  # the steps read a warm cache


def test_bench_step_reference_arm_writes_both_arms(demo_manifest, tmp_path, capsys):
    out = tmp_path / "step.json"
    code = main(["bench", "step", "--config", "swin-dae-tiny", "--manifest", str(demo_manifest), "--steps", "1",
                 "--warmup", "0", "--reference", "monai-swin-ssl", "--json", str(out), "data.num_workers=0",
                 "data.roi=[32,64,64]", "data.batch_size=1", f"data.cache_dir={tmp_path / 'cache'}"])
    assert code == 0
    result = json.loads(out.read_text())
    assert list(result["arms"]) == ["volpre", "monai-swin-ssl"] and result["config"] == "swin-dae-tiny"
    for arm in result["arms"].values():
        _check_arm(arm, 2)
    ratio = result["arms"]["volpre"]["samples_per_s"] / result["arms"]["monai-swin-ssl"]["samples_per_s"]
    assert result["volpre_over_reference"] == pytest.approx(ratio)
    assert "volpre / reference:" in capsys.readouterr().out


def test_bench_step_reference_refuses_crops_it_cannot_run(capsys):
    assert main(["bench", "step", "--config", "swin-dae-tiny", "--reference", "monai-swin-ssl"]) == 2
    assert "two tokens at stride 32 (a crop side of 64 or more), got crops of [32, 32, 32]" in capsys.readouterr().err
    assert main(["bench", "step", "--config", "swin-dae-tiny", "--reference", "monai-swin-ssl",
                 "data.roi=[64,64,32]"]) == 2
    assert "last two axes, which must be equal; got crops of [64, 64, 32]" in capsys.readouterr().err


def test_flop_count_of_a_linear_layer_forward_and_backward():
    import torch

    from volpre.bench.step import _count_flops

    layer, x = torch.nn.Linear(16, 8, bias=False), torch.rand(4, 16, requires_grad=True)
    # forward 2*B*I*O; backward twice that (gradients of the input and of the weight)
    assert _count_flops(lambda: layer(x).sum()) == 3 * 2 * 4 * 16 * 8


def test_reference_views_rotate_back_and_drop_patches_in_a_copy():
    import torch

    from volpre.bench.reference import drop_patches, rotate_views

    x = torch.rand(6, 1, 8, 16, 16)
    rotated, turns = rotate_views(x, torch.Generator().manual_seed(0))
    assert turns.dtype == torch.int64 and set(turns.tolist()) <= {0, 1, 2, 3} and len(set(turns.tolist())) > 1
    for sample, turned, k in zip(x, rotated, turns.tolist()):
        assert torch.equal(turned.rot90(-k, (2, 3)), sample)
    before = x.clone()
    cut = drop_patches(x, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    assert torch.equal(x, before)  # the input is left alone
    changed = (cut != x).float().mean(dim=(1, 2, 3, 4))
    assert (changed > 0).any() and (changed <= 0.61).all()  # up to 30% noise, then up to 30% from another sample


def test_failing_benchmark_process_reports_its_error(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(RuntimeError, match=r"benchmark step write_bench_ct failed: OutputExistsError: "
                                           r"benchmark volumes output .*taken is a non-empty directory"):
        run_isolated(write_bench_ct, tmp_path / "taken", 1)


def test_gpu_acceptance_cases_cover_every_full_size_config_and_the_special_runs():
    from volpre.bench.gpu import acceptance_cases, full_size_configs

    configs = full_size_configs(None)
    assert "swin-dae" in configs and "resnet-mvm" in configs
    assert not any(c.endswith("-tiny") or c.startswith("nnunet") for c in configs)  # nnU-Net needs a plans file
    assert {"nnunet-dae", "nnunet-mvm"} <= set(full_size_configs(Path("plans.json")))
    cases = {c.name: c for c in acceptance_cases(configs, "swin-dae", "resnet-dae", "bf16", None)}
    assert all(cases[c].argv == ("--config", c, "--amp", "bf16") for c in configs)
    assert cases["resnet-dae fp16"].argv[-2:] == ("--amp", "fp16")
    assert "--compile" in cases["swin-dae compile"].argv
    assert "model.swin.use_checkpoint=true" in cases["swin-dae gradient checkpointing"].argv
    assert cases["swin-dae vs monai-swin-ssl"].argv[-2:] == ("--reference", "monai-swin-ssl")
    assert cases["resnet-dae torchrun"].kind == "torchrun"
    plans = acceptance_cases(["nnunet-dae"], "swin-dae", "resnet-dae", "bf16", Path("p.json"))[0]
    assert plans.argv[-1] == "model.nnunet.plans=p.json"


def test_gpu_acceptance_smoke_run_on_the_cpu_records_results_and_failures(tmp_path, capsys):
    # the reference case fails on the tiny config's 32^3 crops: recorded with its error, exit code 1
    code = main(["bench", "gpu", "--out", str(tmp_path), "--device", "cpu", "--configs", "resnet-dae-tiny",
                 "--swin", "swin-dae-tiny", "--resnet", "resnet-dae-tiny", "--amp", "none", "--steps", "1",
                 "--warmup", "0", "--skip", "fp16", "--skip", "compile", "--skip", "checkpointing",
                 "--skip", "torchrun"])
    assert code == 1
    assert "failed: swin-dae-tiny vs monai-swin-ssl" in capsys.readouterr().err
    report = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert report["device"] == "cpu" and report["peak_bf16_tflops"] is None
    assert report["skipped"] == ["resnet-dae-tiny fp16", "swin-dae-tiny compile",
                                 "swin-dae-tiny gradient checkpointing", "resnet-dae-tiny torchrun"]
    ok, failed = report["cases"]
    assert ok["ok"] and ok["name"] == "resnet-dae-tiny" and ok["arms"]["volpre"]["samples_per_s"] > 0
    assert ok["arms"]["volpre"]["achieved_tflops"] > 0 and ok["arms"]["volpre"]["model_flop_utilisation"] is None
    assert not failed["ok"] and failed["returncode"] == 2 and "a crop side of 64 or more" in failed["error"]
    assert report["failed"] == [failed["name"]]


def test_bench_gpu_without_cuda_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert main(["bench", "gpu", "--out", "x"]) == 2
    assert "torch sees no CUDA device (pass --device cpu" in capsys.readouterr().err
