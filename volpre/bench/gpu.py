"""``volpre bench gpu``: the GPU acceptance run, one command that proves the GPU path the first
time a GPU is at hand, and writes one JSON of what it measured.

Cases (each in its own process, with a time limit; a failure is recorded with its traceback and
the run goes on):

- every shipped full-size config (the nnU-Net ones need ``--nnunet-plans``) at its real crop
  size, ``--steps`` steps of ``volpre bench step`` in bf16 (the trainer's own step);
- ``resnet-dae`` in fp16 with the GradScaler;
- ``swin-dae`` with ``train.compile=true``, and with gradient checkpointing
  (``model.swin.use_checkpoint=true``);
- ``swin-dae`` against the MONAI Swin-SSL recipe (``--reference monai-swin-ssl``);
- ``torchrun --nproc_per_node=1`` of ``volpre pretrain`` (``resnet-dae``; one process joins no
  process group, so NCCL itself is exercised only with two or more GPUs).

Per step case: samples/s, peak device memory, first and last loss, FLOPs per sample
(``FlopCounterMode``, forward and backward) and the model FLOP utilisation: FLOPs per sample x
samples/s over the device's dense bf16 peak (:data:`PEAK_BF16_TFLOPS` by device name, or
``--peak-tflops``; None when unknown). The demo data (4 subjects) is the input: speed and memory
depend on the crop size, not on what the crops show. Exit code 1 when any case failed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from volpre.config import shipped_configs
from volpre.files import atomic_write_text
from volpre.processes import CommandTimeout, run_logged

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
"""Dense bf16 tensor-core peak (TFLOP/s, without sparsity) by a name the device's name contains (SXM
figures from NVIDIA's data sheets; a PCIe card's peak is lower: pass ``--peak-tflops``)."""

CASE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    """Arguments after ``volpre``: a ``bench step`` or ``pretrain`` command line, without the data and output."""
    kind: str = "step"
    """``step`` (``volpre bench step``) or ``torchrun`` (``volpre pretrain`` under torchrun)."""


def acceptance_cases(configs: list[str], swin: str, resnet: str, amp: str, nnunet_plans: Path | None) -> list[Case]:
    """The cases of one acceptance run (see the module docstring)."""
    cases = []
    for config in configs:
        extra = (f"model.nnunet.plans={nnunet_plans}",) if config.startswith("nnunet") else ()
        cases.append(Case(config, ("--config", config, "--amp", amp) + extra))
    cases += [
        Case(f"{resnet} fp16", ("--config", resnet, "--amp", "fp16")),
        Case(f"{swin} compile", ("--config", swin, "--amp", amp, "--compile")),
        Case(f"{swin} gradient checkpointing", ("--config", swin, "--amp", amp, "model.swin.use_checkpoint=true")),
        Case(f"{swin} vs monai-swin-ssl", ("--config", swin, "--amp", amp, "--reference", "monai-swin-ssl")),
        Case(f"{resnet} torchrun", ("--config", resnet, f"train.amp={amp}"), kind="torchrun"),
    ]
    return cases


def full_size_configs(nnunet_plans: Path | None) -> list[str]:
    """The shipped configs that are not CPU profiles (``-tiny``); nnU-Net's only with a plans file."""
    return [c for c in shipped_configs() if not c.endswith("-tiny") and (nnunet_plans or not c.startswith("nnunet"))]


def run_gpu_acceptance(out_dir: Path, steps: int = 30, warmup: int = 3, device: str = "cuda",
                       configs: list[str] | None = None, swin: str = "swin-dae", resnet: str = "resnet-dae",
                       amp: str = "bf16", nnunet_plans: Path | None = None, peak_tflops: float | None = None,
                       skip: tuple[str, ...] = (), case_timeout_s: float = CASE_TIMEOUT_S, say=print) -> dict:
    """Run every case (but those whose name contains a ``skip`` word); write and return
    ``OUT_DIR/gpu_acceptance.json``: ``{"device", "torch", "cuda", "peak_bf16_tflops", "steps", "wall_s",
    "cases": [...], "skipped": [names], "failed": [names]}``."""
    from volpre.demo.synthetic import write_demo_data

    out_dir = Path(out_dir)
    (out_dir / "cases").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    manifest = out_dir / "data" / "manifest.json"
    if not manifest.exists():
        manifest = write_demo_data(out_dir / "data", subjects=4, seed=0)
    device_name = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else "cpu"
    if peak_tflops is None:
        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)
    configs = full_size_configs(nnunet_plans) if configs is None else configs
    results, skipped = [], []
    for case in acceptance_cases(configs, swin, resnet, amp, nnunet_plans):
        if any(word in case.name for word in skip):
            skipped.append(case.name)
            continue
        say(f"[{time.perf_counter() - start:6.0f} s] {case.name} ...")
        result = _run_case(case, out_dir, manifest, steps, warmup, device, case_timeout_s, peak_tflops)
        say(f"         {'ok' if result['ok'] else 'FAILED'}: {_summary(result)}")
        results.append(result)
    report = {
        "device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "peak_bf16_tflops": peak_tflops, "steps": steps, "warmup": warmup, "amp": amp,
        "wall_s": time.perf_counter() - start, "cases": results, "skipped": skipped,
        "failed": [r["name"] for r in results if not r["ok"]],
    }
    atomic_write_text(out_dir / "gpu_acceptance.json", json.dumps(report, indent=2) + "\n")
    return report


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _run_case(case: Case, out_dir: Path, manifest: Path, steps: int, warmup: int, device: str, timeout_s: float,
              peak_tflops: float | None) -> dict:
    slug = _slug(case.name)
    log = out_dir / "cases" / f"{slug}.log"
    result: dict = {"name": case.name, "kind": case.kind, "command": list(case.argv), "log": str(log), "ok": False}
    started = time.perf_counter()
    try:
        if case.kind == "step":
            json_out = out_dir / "cases" / f"{slug}.json"
            cmd = [sys.executable, "-m", "volpre", "bench", "step", *case.argv, "--manifest", str(manifest),
                   "--steps", str(steps), "--warmup", str(warmup), "--device", device, "--json", str(json_out)]
            returncode = run_logged(cmd, log, timeout_s, env=_child_env())
            if returncode == 0:
                bench = json.loads(json_out.read_text())
                result["arms"] = {name: _with_utilisation(arm, peak_tflops) for name, arm in bench["arms"].items()}
                result["volpre_over_reference"] = bench["volpre_over_reference"]
        else:
            output = out_dir / "cases" / slug
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
                   "volpre", "pretrain", *case.argv, "--manifest", str(manifest), "--output", str(output),
                   "--max-steps", str(steps), "--device", device]
            returncode = run_logged(cmd, log, timeout_s, env=_child_env())
            if returncode == 0:
                records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
                losses = [r["loss"] for r in records if "loss" in r]
                result.update(checkpoint=(output / "checkpoints" / "last.pt").exists(),
                              loss_first=losses[0], loss_last=losses[-1])
                if not result["checkpoint"]:
                    returncode = -1
                    result["error"] = "the run exited 0 but wrote no checkpoints/last.pt"
        result["returncode"] = returncode
        result["ok"] = returncode == 0
        if returncode != 0 and "error" not in result:
            result["error"] = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    except CommandTimeout as error:
        result["error"] = str(error)
    except Exception:  # noqa: BLE001 - a broken case is reported, the run goes on
        result["error"] = traceback.format_exc()
    result["wall_s"] = time.perf_counter() - started
    return result


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _with_utilisation(arm: dict, peak_tflops: float | None) -> dict:
    achieved = arm["flops_per_sample"] * arm["samples_per_s"]
    return {**arm, "achieved_tflops": achieved / 1e12,
            "model_flop_utilisation": None if not peak_tflops else achieved / (peak_tflops * 1e12)}


def _summary(result: dict) -> str:
    if not result["ok"]:
        lines = (result.get("error") or "").strip().splitlines()
        return lines[-1] if lines else "failed"
    if "arms" not in result:
        return f"loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}, checkpoint written"
    parts = []
    for name, arm in result["arms"].items():
        memory = "" if arm["peak_memory_bytes"] is None else f", {arm['peak_memory_bytes'] / 2**30:.1f} GiB"
        mfu = "" if arm["model_flop_utilisation"] is None else f", MFU {100 * arm['model_flop_utilisation']:.0f}%"
        parts.append(f"{name} {arm['samples_per_s']:.1f} samples/s{memory}{mfu}")
    return "; ".join(parts)
