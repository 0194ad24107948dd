"""``volpre bench data``, ``step``, ``gpu`` and ``ct-volumes``: benchmarks and their volumes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from volpre.commands.options import (UserError, add_actions, add_command, add_device_option, add_overrides_argument,
                                     add_xyz_option, check_sizes, check_workers, to_stderr)


def _check_steps(args: argparse.Namespace) -> None:
    if args.steps < 1 or args.warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")


def run_data(args: argparse.Namespace) -> int:
    from volpre.bench.data import PIPELINES, format_table, run_data_bench, write_json
    from volpre.config import load_config

    cfg = load_config(args.config, args.overrides)
    pipelines = [p.strip() for p in args.pipelines.split(",")] if args.pipelines else list(PIPELINES)
    unknown = [p for p in pipelines if p not in PIPELINES]
    if unknown:
        raise UserError(f"--pipelines: unknown pipeline {unknown[0]!r}; choose from {', '.join(PIPELINES)}")
    workers = check_workers(cfg.data.num_workers if args.workers is None else args.workers)
    if args.min_seconds <= 0:
        raise UserError(f"--min-seconds must be > 0, got {args.min_seconds}")
    results = run_data_bench(args.manifest, cfg, check_sizes("--roi", args.roi), workers, pipelines, args.min_seconds,
                             say=to_stderr)
    print(format_table(results))
    if args.json is not None:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    return 0


def run_step(args: argparse.Namespace) -> int:
    import json

    from volpre.bench.step import format_step_table, run_step_bench
    from volpre.config import load_config

    overrides = list(args.overrides)
    if args.amp is not None:
        overrides.append(f"train.amp={args.amp}")
    if args.compile:
        overrides.append("train.compile=true")
    cfg = load_config(args.config, overrides)
    _check_steps(args)
    result = run_step_bench(cfg, args.manifest, args.steps, args.warmup, args.device, reference=args.reference,
                            say=to_stderr)
    result["config"] = args.config
    print(format_step_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def run_gpu(args: argparse.Namespace) -> int:
    import torch

    from volpre.bench.gpu import run_gpu_acceptance

    _check_steps(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("bench gpu: torch sees no CUDA device (pass --device cpu for a smoke run of the cases)")
    configs = None if args.configs is None else [c for c in args.configs.split(",") if c]
    report = run_gpu_acceptance(args.out, args.steps, args.warmup, args.device, configs, args.swin, args.resnet,
                                args.amp, args.nnunet_plans, args.peak_tflops, tuple(args.skip))
    print(f"wrote {args.out / 'gpu_acceptance.json'} ({len(report['cases'])} cases in {report['wall_s']:.0f} s)")
    if report["failed"]:
        print(f"failed: {', '.join(report['failed'])} (errors in the JSON and in {args.out / 'cases'})",
              file=sys.stderr)
        return 1
    return 0


def run_ct_volumes(args: argparse.Namespace) -> int:
    from volpre.bench.volumes import write_bench_ct

    manifest = write_bench_ct(args.out, volumes=args.volumes, entries=args.entries, shape=tuple(args.shape),
                              spacing=tuple(args.spacing), seed=args.seed)
    print(f"wrote {args.volumes} CT volumes of {'x'.join(map(str, args.shape))} voxels; manifest: {manifest}")
    return 0


def add_parser(subparsers) -> None:
    bsub = add_actions(subparsers, "bench", help="benchmarks: data throughput, training step breakdown, GPU "
                       "acceptance, benchmark volumes")
    for add in (_add_data, _add_step, _add_gpu, _add_ct_volumes):
        add(bsub)


def _add_json_option(q: argparse.ArgumentParser) -> None:
    q.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")


def _add_steps_options(q: argparse.ArgumentParser, steps: int, measured: str) -> None:
    """``--steps`` (``steps`` by default, each as ``measured`` says) and ``--warmup``, as
    :func:`_check_steps` checks them."""
    q.add_argument("--steps", type=int, default=steps, help=f"{measured} (default: {steps})")
    q.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (default: 3)")


def _add_data(bsub) -> None:
    q = add_command(bsub, "data", run_data,
                    help="random-crop throughput: plain MONAI, PersistentDataset, volpre cold and warm",
                    description="""Measure, on the same CT NIfTI files, crops/s, seconds, peak memory and cache size of
                    (a) the plain MONAI pipeline, (b) the same with MONAI's PersistentDataset, (c) volpre's loader
                    building its cache and (d) volpre's loader on the built cache. Prints a table with ratios against
                    (a).""")
    q.add_argument("manifest", type=Path)
    add_xyz_option(q, "--roi", int, required=True, help="crop size in voxels, e.g. 96 96 64")
    q.add_argument("--workers", type=int, help="DataLoader workers of every pipeline (default: data.num_workers; "
                   "at most the CPUs available to this process, as in training)")
    _add_json_option(q)
    q.add_argument("--config", default="swin-dae", help="config whose preprocess and data sections apply "
                   "(default: swin-dae)")
    q.add_argument("--pipelines", help="comma-separated subset of reference,persistent,volpre_cold,volpre_warm "
                   "(default: all)")
    q.add_argument("--min-seconds", type=float, default=3.0, help="warm pipelines repeat passes until this long "
                   "(default: 3)")
    add_overrides_argument(q, "config overrides, e.g. preprocess.spacing=[2,2,2]")


def _add_step(bsub) -> None:
    q = add_command(bsub, "step", run_step,
                    help="steady-state pretraining step: data wait, host-to-device, forward, backward, "
                    "optimizer; FLOPs, peak memory; optionally against the MONAI Swin-SSL recipe",
                    description="""Time the phases of pretraining steps with the trainer's own step, model, optimizer
                    and crop stream on a warm cache; print each phase's share, samples/s, FLOPs per sample and peak
                    device memory. --reference monai-swin-ssl also times the step of MONAI's Swin-UNETR self-supervised
                    recipe (rotation, contrastive and reconstruction heads) at the same crop, batch and precision, and
                    prints the ratio.""")
    q.add_argument("--config", required=True, help="shipped config name or a YAML path")
    q.add_argument("--manifest", type=Path, help="default: the demo data (4 subjects), written to a temporary folder")
    _add_steps_options(q, 20, "measured steps")
    add_device_option(q)
    q.add_argument("--amp", choices=["bf16", "fp16", "none"], help="autocast precision (train.amp; default: the "
                   "config's)")
    q.add_argument("--compile", action="store_true", help="torch.compile the step (train.compile=true)")
    q.add_argument("--reference", choices=["monai-swin-ssl"], help="also time this reference recipe's step; its "
                   "Swin needs crops with a side of 64+ and equal last two sides")
    _add_json_option(q)
    add_overrides_argument(q, "config overrides, e.g. data.num_workers=2")


def _add_gpu(bsub) -> None:
    q = add_command(bsub, "gpu", run_gpu,
                    help="GPU acceptance: every full-size config for a few steps, fp16, compile, "
                    "gradient checkpointing, the reference recipe, torchrun; one JSON",
                    description="""Run each acceptance case in its own process (bench step of every shipped full-size
                    config at its real crop size in bf16; resnet-dae in fp16; swin-dae compiled, with gradient
                    checkpointing and against monai-swin-ssl; volpre pretrain under torchrun) and write
                    OUT/gpu_acceptance.json with samples/s, peak memory, first and last loss, FLOPs and model FLOP
                    utilisation, and each failure's traceback. Exit 1 if any case failed.""")
    q.add_argument("--out", type=Path, required=True, help="folder for the JSON, the cases' logs and the demo data")
    _add_steps_options(q, 30, "measured steps per case")
    q.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="default: cuda (cpu: a smoke run)")
    q.add_argument("--amp", choices=["bf16", "fp16", "none"], default="bf16", help="precision of the cases "
                   "(default: bf16; the fp16 case is always fp16)")
    q.add_argument("--configs", help="comma-separated configs to run (default: every shipped full-size config)")
    q.add_argument("--swin", default="swin-dae", help="config of the compile, checkpointing and reference cases")
    q.add_argument("--resnet", default="resnet-dae", help="config of the fp16 and torchrun cases")
    q.add_argument("--nnunet-plans", type=Path, help="an nnU-Net plans file: adds the nnunet configs")
    q.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: by device name)")
    q.add_argument("--skip", action="append", default=[], metavar="WORD",
                   help="skip the cases whose name contains WORD (repeatable), e.g. --skip compile")


def _add_ct_volumes(bsub) -> None:
    q = add_command(bsub, "ct-volumes", run_ct_volumes,
                    help="write CT volumes of realistic size for `bench data` (deterministic)",
                    description="""Resample the demo CT phantoms to SHAPE voxels of SPACING mm, add 12 HU of noise and
                    write int16 .nii.gz files and OUT/manifest.json (ENTRIES entries cycling over the VOLUMES
                    files).""")
    q.add_argument("out", type=Path)
    q.add_argument("--volumes", type=int, default=20)
    q.add_argument("--entries", type=int, help="manifest entries (default: one per volume)")
    add_xyz_option(q, "--shape", int, default=[256, 256, 200])
    add_xyz_option(q, "--spacing", float, default=[1.4, 1.4, 1.6])
    q.add_argument("--seed", type=int, default=0)
