"""``volpre bench step``: where the time of a steady-state pretraining step goes, and how it
compares with the MONAI Swin-UNETR self-supervised recipe's step (``--reference monai-swin-ssl``).

The volpre arm is the trainer itself: a :class:`~volpre.engine.trainer.Pretraining` (model,
optimiser, scheduler, EMA, compile, AMP as the config says) fed by its own crop stream
(:meth:`~volpre.engine.trainer.Pretraining.step_batches`, on a cache warmed first, untimed), and
stepped by its own :meth:`~volpre.engine.trainer.Pretraining.train_step`, which reports the end
of each phase to this module's clock. After ``warmup`` unmeasured steps, ``steps`` steps are
timed phase by phase:

- ``data_wait``: waiting for the step's micro-batches (the DataLoader workers, and on the CPU
  the copies);
- ``host_to_device``: what remains of the copies to the device once the batches are handed out
  (on CUDA they run on a side stream, ahead of use);
- ``forward`` (the step's random draws included), ``backward``, ``optimizer`` (clipping,
  optimiser, scheduler, EMA).

On a GPU the device is synchronised at each phase's end, so each phase's time is its own (the
trainer itself never synchronises; its copies and steps overlap). FLOPs per sample count one
eager forward and backward with ``torch.utils.flop_counter.FlopCounterMode`` (multiply-adds
count 2); peak device memory is CUDA's ``max_memory_allocated`` over the measured steps (None on
the CPU). The reference arm (:mod:`volpre.bench.reference`) reads the same crop stream and runs
at the config's crop, batch, width (``model.swin.feature_size``), precision and compile setting.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from volpre.bench.reference import NAME as REFERENCE_NAME
from volpre.bench.reference import ReferenceStep, crop_problem, reference_loss
from volpre.config import RunConfig
from volpre.data.cache import VolumeCache, build_cache, cache_dir_for
from volpre.data.manifest import load_manifest
from volpre.data.nnunet_plan import resolve_run_config
from volpre.demo.synthetic import write_demo_data
from volpre.engine.distributed import DistContext
from volpre.engine.trainer import Pretraining
from volpre.errors import UserInputError


class BenchInputError(UserInputError, ValueError):
    """``bench step`` cannot run with the given options (a reference the crops do not fit)."""


PHASES = ("data_wait", "host_to_device", "forward", "backward", "optimizer")
REFERENCES = (REFERENCE_NAME,)


class PhaseClock:
    """Adds the time since the previous mark to the phase that just ended (synchronising CUDA first)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.recording = False
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def mark(self, phase: str, synchronize: bool = True) -> None:
        if synchronize and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self.recording:
            self.totals[phase] += now - self._last
        self._last = now


def run_step_bench(cfg: RunConfig, manifest_path: Path | None, steps: int, warmup: int = 3,
                   device: str | None = None, reference: str | None = None,
                   say: Callable[[str], None] = print) -> dict:
    """Time ``steps`` pretraining steps phase by phase (and the reference recipe's, if asked).

    Without ``manifest_path`` the demo data (4 subjects) is written to a temporary folder. Returns
    ``{"encoder", "objective", "device", "steps", "warmup", "amp", "compile", "roi", "arms": {name: arm},
    "volpre_over_reference"}``, each arm ``{"samples_per_step", "step_s", "samples_per_s",
    "phases": {phase: {"s", "fraction"}}, "data_wait_fraction", "flops_per_sample",
    "peak_memory_bytes", "parameters", "loss_first", "loss_last"}``; the ratio is volpre's
    samples/s over the reference's (None without a reference).
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"bench step needs steps >= 1 and warmup >= 0, got {steps} and {warmup}")
    if reference is not None and reference not in REFERENCES:
        raise ValueError(f"unknown reference {reference!r}; choose from {', '.join(REFERENCES)}")
    if reference is not None and cfg.data.roi is not None and crop_problem(list(cfg.data.roi)):
        raise BenchInputError(f"--reference: {crop_problem(list(cfg.data.roi))}; e.g. data.roi=[32,64,64]")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=dev, backend=None)
    with tempfile.TemporaryDirectory(prefix="volpre-bench-step-") as tmp:
        if manifest_path is None:
            say("no --manifest: writing the demo data (4 subjects) to a temporary folder")
            manifest_path = write_demo_data(Path(tmp) / "demo", subjects=4, seed=0)
        manifest_path = Path(manifest_path)
        cfg = resolve_run_config(cfg)  # data.roi: null -> the nnU-Net plan's patch size
        run = Pretraining(cfg, manifest_path, Path(tmp) / "run", ctx)
        _warm_cache(run, say)
        arms = {"volpre": _measure_volpre(run, steps, warmup, say)}
        if reference is not None:
            arms[reference] = _measure_reference(run, steps, warmup, say)
        del run
    ratio = None
    if reference is not None:
        ratio = arms["volpre"]["samples_per_s"] / arms[reference]["samples_per_s"]
    return {"encoder": cfg.model.encoder,
            "objective": cfg.objective.name, "device": str(dev), "steps": steps, "warmup": warmup,
            "amp": cfg.train.amp, "compile": cfg.train.compile, "roi": list(cfg.data.roi),
            "workers": cfg.data.num_workers, "arms": arms, "volpre_over_reference": ratio}


def _warm_cache(run: Pretraining, say: Callable[[str], None]) -> None:
    cfg = run.cfg
    cache = VolumeCache.create(cache_dir_for(cfg.data, run.manifest_path), cfg.preprocess, run.plan)
    say(f"warming the cache {cache.directory} ...")
    report = build_cache(load_manifest(run.manifest_path).entries, cache, cfg.data.num_workers)
    if not report.ok:
        say(f"{len(report.failures)} entries failed their checks; their items are replaced by others")


def _measure_volpre(run: Pretraining, steps: int, warmup: int, say: Callable[[str], None]) -> dict:
    batches = run.step_batches()
    first = next(batches)
    flops = _count_flops(lambda: _volpre_loss(run, first[0]))
    run.module.zero_grad(set_to_none=True)

    def step(group: list[dict], mark: Callable[[str], None]) -> list[tuple[int, torch.Tensor]]:
        out = run.train_step(group, mark=mark)
        return [(sum(int(b["image"].shape[0]) for b in group), out["values"]["loss"])]

    say(f"volpre: timing {steps} steps after {warmup} warm-up steps on {run.ctx.device} ...")
    clock, samples, losses = _timed_steps(run.ctx.device, batches, first, steps, warmup, step)
    return _arm(clock, steps, samples, flops / int(first[0]["image"].shape[0]), run.ctx.device,
                sum(p.numel() for p in run.module.parameters()), losses)


def _volpre_loss(run: Pretraining, batch: dict) -> torch.Tensor:
    generator = torch.Generator(device=run.ctx.device).manual_seed(0)
    return run.module(batch, run.module.draw(batch, generator)).loss


def _measure_reference(run: Pretraining, steps: int, warmup: int, say: Callable[[str], None]) -> dict:
    cfg, device = run.cfg, run.ctx.device
    if cfg.model.encoder != "swin":
        say(f"note: the {REFERENCE_NAME} reference is a Swin recipe; it runs at this config's crop and batch "
            f"with feature_size {cfg.model.swin.feature_size}")
    t = cfg.train
    ref = ReferenceStep(cfg.model.in_channels, cfg.model.swin.feature_size, t.lr, t.weight_decay, t.amp, device,
                        use_checkpoint=cfg.model.swin.use_checkpoint, compile_model=t.compile, seed=t.seed)
    batches = run.step_batches()
    first = next(batches)
    image = first[0]["image"]
    flops = _count_flops(lambda: reference_loss(ref.module, image, torch.Generator().manual_seed(0),
                                                torch.Generator(device=device).manual_seed(0)))
    ref.module.zero_grad(set_to_none=True)

    def step(group: list[dict], mark: Callable[[str], None]) -> list[tuple[int, torch.Tensor]]:
        # one optimiser step per micro-batch: the recipe has no accumulation
        return [(int(b["image"].shape[0]), ref.step(b["image"], mark)) for b in group]

    say(f"{REFERENCE_NAME}: timing {steps} steps after {warmup} warm-up steps on {device} ...")
    clock, samples, losses = _timed_steps(device, batches, first, steps, warmup, step)
    return _arm(clock, steps * len(first), samples, flops / int(image.shape[0]), device,
                sum(p.numel() for p in ref.module.parameters()), losses)


def _timed_steps(device: torch.device, batches, first: list[dict], steps: int, warmup: int,
                 step: Callable) -> tuple[PhaseClock, int, list[torch.Tensor]]:
    """Run ``warmup + steps`` steps (``step(group, mark) -> [(samples, loss)]``), the first on ``first``; time
    the measured ones phase by phase. Returns the clock, the measured samples and losses."""
    clock = PhaseClock(device)
    losses, samples = [], 0
    for index in range(warmup + steps):
        if index == warmup:
            _reset_peak_memory(device)
        clock.recording = index >= warmup
        clock.start()
        group = first if index == 0 else next(batches)
        clock.mark("data_wait", synchronize=False)
        clock.mark("host_to_device")
        for n, loss in step(group, clock.mark):
            if clock.recording:
                samples += n
                losses.append(loss)
    return clock, samples, losses


def _count_flops(loss_fn: Callable[[], torch.Tensor]) -> float:
    """FLOPs of one eager forward and backward (``FlopCounterMode``: a multiply-add is 2 FLOPs)."""
    with FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    return float(counter.get_total_flops())


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _arm(clock: PhaseClock, steps: int, samples: int, flops_per_sample: float, device: torch.device,
         parameters: int, losses: list[torch.Tensor]) -> dict:
    total = sum(clock.totals.values())
    phases = {p: {"s": clock.totals[p] / steps, "fraction": clock.totals[p] / total} for p in PHASES}
    return {
        "samples_per_step": samples / steps, "step_s": total / steps, "samples_per_s": samples / total,
        "phases": phases, "data_wait_fraction": phases["data_wait"]["fraction"],
        "flops_per_sample": flops_per_sample,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "parameters": parameters, "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
    }


def format_step_table(result: dict) -> str:
    """The phases of every arm as a table, then samples/s, FLOPs and memory per arm."""
    arms = result["arms"]
    lines = [f"{'phase':<16}" + "".join(f"{name + ' ms':>22}{'share':>8}" for name in arms)]
    for phase in PHASES:
        lines.append(f"{phase:<16}" + "".join(f"{1000 * a['phases'][phase]['s']:>22.1f}"
                                              f"{100 * a['phases'][phase]['fraction']:>7.1f}%" for a in arms.values()))
    lines.append(f"{'step':<16}" + "".join(f"{1000 * a['step_s']:>22.1f}{100.0:>7.1f}%" for a in arms.values()))
    for name, a in arms.items():
        memory = "n/a on the CPU" if a["peak_memory_bytes"] is None else f"{a['peak_memory_bytes'] / 2**30:.2f} GiB"
        lines.append(f"{name}: {a['samples_per_s']:.2f} samples/s ({a['samples_per_step']:.0f} crops per step), "
                     f"{a['flops_per_sample'] / 1e9:.2f} GFLOP per sample (forward + backward), "
                     f"{a['parameters'] / 1e6:.2f} M parameters, peak memory {memory}")
    lines.append(f"crops of {'x'.join(map(str, result['roi']))}, amp {result['amp']}, compile "
                 f"{str(result['compile']).lower()}, {result['workers']} workers, {result['device']}")
    if result["volpre_over_reference"] is not None:
        lines.append(f"volpre / reference: {result['volpre_over_reference']:.2f}x samples/s")
    return "\n".join(lines)
