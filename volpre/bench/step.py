"""``volpre bench step``: where the time of a steady-state pretraining step goes.

Builds the run's pieces as the trainer does -- the pretrainer (``volpre.objectives.build_pretrainer``),
AdamW over the trainer's parameter groups, the crop stream (``PretrainDataset`` on the cache,
``InfiniteShardSampler``, :func:`~volpre.data.dataset.crop_loader`) -- warms the cache (untimed),
then times each phase of ``steps`` steps after ``warmup`` unmeasured ones:

- ``data_wait``: waiting for the next batch from the DataLoader workers;
- ``host_to_device``: copying it to the device;
- ``forward``, ``backward``, ``optimizer``: the model's phases (under the run's autocast).

On a GPU the device is synchronised between phases so each phase's time is its own (the trainer
itself never synchronises; its copies overlap compute). One step is one micro-batch
(``train.grad_accum`` does not change the per-phase costs).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from volpre.config import RunConfig
from volpre.data.cache import CachedCrops, VolumeCache, build_cache, cache_dir_for
from volpre.data.dataset import InfiniteShardSampler, PretrainDataset, crop_loader
from volpre.data.manifest import load_manifest
from volpre.data.synthetic import write_demo_data
from volpre.engine.batches import to_device
from volpre.engine.trainer import param_groups
from volpre.objectives import build_items, build_pretrainer

PHASES = ("data_wait", "host_to_device", "forward", "backward", "optimizer")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_step_bench(cfg: RunConfig, manifest_path: Path | None, steps: int, warmup: int = 3,
                   device: str | None = None, say: Callable[[str], None] = print) -> dict:
    """Time ``steps`` pretraining steps phase by phase; return mean seconds per phase and rates.

    Without ``manifest_path`` the demo data (4 subjects) is written to a temporary folder.
    Returns ``{"steps", "warmup", "device", "samples_per_step", "step_s", "samples_per_s",
    "phases": {phase: {"s", "fraction"}}, "data_wait_fraction"}``.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"bench step needs steps >= 1 and warmup >= 0, got {steps} and {warmup}")
    with tempfile.TemporaryDirectory(prefix="volpre-bench-step-") as tmp:
        if manifest_path is None:
            say("no --manifest: writing the demo data (4 subjects) to a temporary folder")
            manifest_path = write_demo_data(Path(tmp) / "demo", subjects=4, seed=0)
        return _measure(cfg, Path(manifest_path), steps, warmup, device, say)


def _measure(cfg: RunConfig, manifest_path: Path, steps: int, warmup: int, device_name: str | None,
             say: Callable[[str], None]) -> dict:
    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    entries = load_manifest(manifest_path).entries
    cache = VolumeCache.create(cache_dir_for(cfg.data, manifest_path), cfg.preprocess)
    say(f"warming the cache {cache.directory} ...")
    report = build_cache(entries, cache, cfg.data.num_workers)
    if not report.ok:
        say(f"{len(report.failures)} entries failed their checks; their items are replaced by others")
    groups = build_items(cfg, entries)
    dataset = PretrainDataset(groups, cfg.preprocess, cfg.data, cfg.train.seed, crops=CachedCrops(cache, cfg.data))
    loader = crop_loader(dataset, InfiniteShardSampler(len(groups), cfg.train.seed), cfg.data,
                         pin_memory=device.type == "cuda")
    torch.manual_seed(cfg.train.seed)
    model = build_pretrainer(cfg).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, betas=(0.9, 0.95))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)

    totals = dict.fromkeys(PHASES, 0.0)
    samples = 0
    batches = iter(loader)
    say(f"timing {steps} steps after {warmup} warm-up steps on {device} ...")
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        host = next(batches)
        t1 = time.perf_counter()
        batch = to_device(host, device, cfg.train.channels_last)
        _synchronize(device)
        t2 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(batch, model.draw(batch, generator))
        _synchronize(device)
        t3 = time.perf_counter()
        scaler.scale(out.loss).backward()
        _synchronize(device)
        t4 = time.perf_counter()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        t5 = time.perf_counter()
        if step >= warmup:
            for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                totals[phase] += seconds
            samples += int(host["image"].shape[0])
    del batches, loader
    step_s = sum(totals.values()) / steps
    phases = {p: {"s": totals[p] / steps, "fraction": totals[p] / steps / step_s} for p in PHASES}
    return {
        "steps": steps, "warmup": warmup, "device": str(device), "samples_per_step": samples / steps,
        "step_s": step_s, "samples_per_s": samples / sum(totals.values()), "phases": phases,
        "data_wait_fraction": phases["data_wait"]["fraction"], "workers": cfg.data.num_workers,
        "roi": list(cfg.data.roi), "encoder": cfg.model.encoder, "objective": cfg.objective.name,
    }


def format_step_table(result: dict) -> str:
    lines = [f"{'phase':<16}{'ms/step':>10}{'share':>8}"]
    for phase, value in result["phases"].items():
        lines.append(f"{phase:<16}{1000 * value['s']:>10.1f}{100 * value['fraction']:>7.1f}%")
    lines.append(f"{'step':<16}{1000 * result['step_s']:>10.1f}{100.0:>7.1f}%")
    lines.append(f"{result['samples_per_s']:.2f} samples/s ({result['samples_per_step']:.0f} crops of "
                 f"{'x'.join(map(str, result['roi']))} per step, {result['workers']} workers, {result['device']})")
    return "\n".join(lines)
