"""The ``volpre`` command (also ``python -m volpre``, which is what torchrun launches).

Each subcommand's arguments are declared here; its work lives in the module it names and is
imported only when the subcommand runs, so ``volpre --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from volpre import __version__


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""


# ----------------------------------------------------------------------------- data


def _cmd_index(args: argparse.Namespace) -> int:
    from volpre.data.index import index_paths

    try:
        summary = index_paths(args.paths, args.out, modality=args.modality, progress=not args.quiet)
    except ValueError as error:
        raise UserError(str(error)) from error
    print(summary.describe())
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from volpre.data.check import check_entries
    from volpre.data.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    entries = manifest.entries if args.split is None else manifest.by_split(args.split)
    bar = tqdm(total=len(entries), unit="entry", disable=args.quiet or not sys.stderr.isatty(), file=sys.stderr)
    report = check_entries(entries, on_problem=lambda p: print(p.line(), flush=True), on_entry=bar.update)
    bar.close()
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from volpre.data.synthetic import write_demo_data

    manifest = write_demo_data(Path(args.out), subjects=args.subjects, seed=args.seed)
    print(f"wrote demo data for {args.subjects} subjects; manifest: {manifest}")
    return 0


def _cmd_manifest_from_decathlon(args: argparse.Namespace) -> int:
    from volpre.data.manifest import from_decathlon, save_manifest

    manifest = from_decathlon(args.datalist, base_dir=args.base_dir, modality=args.modality)
    save_manifest(manifest, args.out)
    print(f"wrote {len(manifest.entries)} entries to {args.out}")
    return 0


def _cmd_manifest_to_decathlon(args: argparse.Namespace) -> int:
    from volpre.data.manifest import load_manifest, to_decathlon

    to_decathlon(load_manifest(args.manifest), args.out)
    print(f"wrote {args.out}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from volpre.config import load_config
    from volpre.data.cache import VolumeCache, build_cache, cache_dir_for
    from volpre.data.manifest import load_manifest

    cfg = load_config(args.config, args.overrides)
    manifest = load_manifest(args.manifest)
    entries = manifest.entries if args.split is None else manifest.by_split(args.split)
    cache = VolumeCache.create(cache_dir_for(cfg.data, args.manifest), cfg.preprocess)
    workers = cfg.data.num_workers if args.workers is None else args.workers
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")

    def show(result) -> None:
        if hasattr(result, "line"):
            print(result.line(), flush=True)

    report = build_cache(entries, cache, workers, on_result=show)
    print(report.summary())
    return 0 if report.ok else 1


# ----------------------------------------------------------------------------- training


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from volpre.config import load_config
    from volpre.engine.trainer import pretrain

    if args.config is None and not args.resume:
        raise UserError("--config is required (a shipped config name or a YAML path) unless --resume")
    cfg = load_config(args.config, args.overrides) if args.config is not None else None
    if cfg is None and args.overrides:
        raise UserError("key=value overrides need --config (with --resume, give the run's config too)")
    splits = tuple(args.splits.split(",")) if args.splits else None
    from volpre.evaluate.errors import EvaluationError
    from volpre.evaluate.probe import TrainingProbe

    try:
        result = pretrain(cfg, Path(args.manifest), Path(args.output), max_steps=args.max_steps,
                          resume=args.resume, device=args.device, splits=splits, probe_factory=TrainingProbe)
    except EvaluationError as error:  # the probe's manifest cannot give a probe
        raise UserError(f"probe: {error}") from error
    if result.checkpoint is not None:
        print(f"step {result.final_step}: checkpoint {result.checkpoint}")
    if result.bad_entries:
        print(f"{len(result.bad_entries)} bad entries were skipped; see {Path(args.output) / 'bad_entries.jsonl'}")
    return 0


# ----------------------------------------------------------------------------- benchmarks


def _roi(text: str) -> tuple[int, int, int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 3) or any(v < 1 for v in values):
        raise UserError(f"--roi takes one edge or three comma-separated sizes, all >= 1 (e.g. 64 or 96,96,64), "
                        f"got {text!r}")
    return tuple(values * 3 if len(values) == 1 else values)


def _cmd_bench_data(args: argparse.Namespace) -> int:
    from volpre.bench.data import PIPELINES, format_table, run_data_bench, write_json
    from volpre.config import load_config

    cfg = load_config(args.config, args.overrides)
    pipelines = [p.strip() for p in args.pipelines.split(",")] if args.pipelines else list(PIPELINES)
    unknown = [p for p in pipelines if p not in PIPELINES]
    if unknown:
        raise UserError(f"--pipelines: unknown pipeline {unknown[0]!r}; choose from {', '.join(PIPELINES)}")
    workers = cfg.data.num_workers if args.workers is None else args.workers
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    if args.min_seconds <= 0:
        raise UserError(f"--min-seconds must be > 0, got {args.min_seconds}")
    results = run_data_bench(args.manifest, cfg, _roi(args.roi), workers, pipelines, args.min_seconds,
                             say=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(results))
    if args.json is not None:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    return 0


def _cmd_bench_step(args: argparse.Namespace) -> int:
    import json

    from volpre.bench.step import format_step_table, run_step_bench
    from volpre.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.steps < 1 or args.warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    result = run_step_bench(cfg, args.manifest, args.steps, args.warmup, args.device,
                            say=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_step_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _cmd_bench_ct_volumes(args: argparse.Namespace) -> int:
    from volpre.bench.volumes import write_bench_ct

    try:
        manifest = write_bench_ct(args.out, volumes=args.volumes, entries=args.entries, shape=tuple(args.shape),
                                  spacing=tuple(args.spacing), seed=args.seed)
    except (ValueError, FileExistsError) as error:
        raise UserError(str(error)) from error
    print(f"wrote {args.volumes} CT volumes of {'x'.join(map(str, args.shape))} voxels; manifest: {manifest}")
    return 0


# ----------------------------------------------------------------------------- export


def _cmd_export(args: argparse.Namespace) -> int:
    from volpre.export import export_bundle

    try:
        bundle = export_bundle(args.checkpoint, args.task, args.out, network=args.network, manifest=args.manifest,
                               modality=args.modality, out_channels=args.out_channels,
                               roi_size=tuple(args.roi) if args.roi else None, weights=args.weights)
    except (ValueError, FileExistsError) as error:  # arguments that do not fit the checkpoint or task
        raise UserError(str(error)) from error
    print(f"wrote {args.task} bundle {bundle}")
    print(f"fine-tune: see {bundle / 'docs' / 'README.md'}")
    return 0


# ----------------------------------------------------------------------------- evaluate


def _cmd_evaluate_label_efficiency(args: argparse.Namespace) -> int:
    from volpre.evaluate import EvaluationError, evaluate_label_efficiency, parse_bundle_overrides, results_table

    try:
        fractions = [float(text) for text in args.fractions.split(",")]
    except ValueError as error:
        raise UserError(f"--fractions: got {args.fractions!r}; expected comma-separated numbers in (0, 1], "
                        "e.g. 0.1,0.25,1.0") from error
    try:
        results = evaluate_label_efficiency(
            args.pretrained, args.manifest, args.out, args.task, fractions, args.seeds, max_steps=args.max_steps,
            network=args.network, modality=args.modality, out_channels=args.out_channels,
            roi_size=tuple(args.roi) if args.roi else None, overrides=parse_bundle_overrides(args.overrides),
            say=lambda line: print(line, file=sys.stderr, flush=True))
    except (EvaluationError, FileExistsError) as error:
        raise UserError(str(error)) from error
    print(results_table(results))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'label_efficiency.png'}")
    return 0


def _cmd_evaluate_probe(args: argparse.Namespace) -> int:
    from volpre.evaluate import EvaluationError
    from volpre.evaluate.probe import compare_with_random_init, probe_table

    try:
        results = compare_with_random_init(
            args.pretrained, args.manifest, args.out, task=args.task, seeds=args.seeds, modality=args.modality,
            weights=args.weights, device=args.device, max_entries=args.max_entries,
            say=lambda line: print(line, file=sys.stderr, flush=True))
    except (EvaluationError, FileExistsError) as error:
        raise UserError(str(error)) from error
    print(probe_table(results))
    print(f"wrote {args.out / 'results.json'}")
    return 0


# ----------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from volpre.demo import DemoError, run_demo

    try:
        epochs = {"segmentation": args.segmentation_epochs, "survival": args.survival_epochs}
        run_demo(args.out, subjects=args.subjects, seed=args.seed, pretrain_steps=args.pretrain_steps,
                 epochs={task: n for task, n in epochs.items() if n is not None})
    except DemoError as error:
        print(f"volpre demo: {error}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="volpre",
        description="Self-supervised pretraining of 3D CT/MRI encoders, exported as MONAI bundles.",
    )
    parser.add_argument("--version", action="version", version=f"volpre {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("index", help="walk folders and write a manifest (one entry per volume or DICOM series)",
                       description="Walk folders of NIfTI/NRRD/MetaImage files and DICOM studies; write a manifest "
                       "with one entry per volume file or DICOM series (shape and spacing from headers; no pixel "
                       "reads for DICOM) and the files it could not use, with reasons.")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="folders or files to index")
    p.add_argument("--out", required=True, type=Path, help="manifest to write (JSON)")
    p.add_argument("--modality", action="append", metavar="CODE|PATTERN=CODE",
                   help="modality of non-DICOM files (DICOM series use their header): a code for all of them "
                   "(--modality CT), or rules matched against the path inside PATH, first match wins "
                   "(--modality '*/ct*=CT' --modality '*/mr*=MR')")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_index)

    p = sub.add_parser("check", help="open every manifest entry and report problems (exit 1 if any)",
                       description="Read every image and label of a manifest with all checks; print one line per "
                       "problem (entry id, file, cause), then a summary. Exit status 0 if all entries are good, "
                       "1 if any has a problem.")
    p.add_argument("manifest", type=Path)
    p.add_argument("--split", help="check only entries of this split")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_check)

    p = sub.add_parser("demo-data", help="write the small deterministic demo dataset and its manifest",
                       description="Write synthetic CT torso and MR head phantoms (NIfTI, NRRD, MetaImage and DICOM "
                       "series), labels and survival outcomes, with OUT/manifest.json.")
    p.add_argument("out", type=Path)
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_cmd_demo_data)

    p = sub.add_parser("manifest", help="convert manifests to and from MONAI decathlon datalists")
    msub = p.add_subparsers(dest="manifest_command", metavar="ACTION")
    msub.required = True
    q = msub.add_parser("from-decathlon", help="decathlon datalist -> volpre manifest")
    q.add_argument("datalist", type=Path)
    q.add_argument("--out", required=True, type=Path)
    q.add_argument("--base-dir", type=Path, help="folder the datalist's paths are relative to (default: its own)")
    q.add_argument("--modality", help="modality of every entry (CT, MR, ...)")
    q.set_defaults(run=_cmd_manifest_from_decathlon)
    q = msub.add_parser("to-decathlon", help="volpre manifest -> decathlon datalist (train/val/test splits)")
    q.add_argument("manifest", type=Path)
    q.add_argument("--out", required=True, type=Path)
    q.set_defaults(run=_cmd_manifest_to_decathlon)

    p = sub.add_parser("cache", help="preprocess every volume once into the crop cache (exit 1 if any fails)",
                       description="Run the deterministic preprocessing (checked read, RAS, resampling, foreground "
                       "crop, MR z-score) once per volume of a manifest and store it where pretraining reads its "
                       "random crops from (data.cache_dir; default: .volpre_cache beside the manifest). Existing "
                       "entries are verified in full; missing, stale (source, config or version changed) and "
                       "corrupt ones are rebuilt. `volpre pretrain` does the same on first use of each volume.")
    p.add_argument("manifest", type=Path)
    p.add_argument("--config", required=True, help="shipped config name or a YAML path (its preprocess and data "
                   "sections apply)")
    p.add_argument("--workers", type=int, help="processes building entries (default: data.num_workers)")
    p.add_argument("--split", help="cache only entries of this split")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.cache_dir=/scratch/c")
    p.set_defaults(run=_cmd_cache)

    p = sub.add_parser("pretrain", help="pretrain an encoder (one process, or many under torchrun)",
                       description="Pretrain an encoder on a manifest's volumes. Writes OUTPUT/metrics.jsonl, "
                       "OUTPUT/checkpoints/ (last.pt, best.pt, step_*.pt) and TensorBoard events under "
                       "OUTPUT/tensorboard. The same command runs under torchrun for DDP.")
    p.add_argument("--config", help="shipped config name (e.g. swin-dae, resnet-mvm-tiny) or a YAML path")
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--max-steps", type=int, help="stop after this optimiser step (default: train.total_steps); "
                   "the schedule always spans train.total_steps, so a stopped run resumes exactly")
    p.add_argument("--resume", action="store_true", help="continue the run in OUTPUT from checkpoints/last.pt")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--splits", help="comma-separated manifest splits to pretrain on (default: every entry)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")
    p.set_defaults(run=_cmd_pretrain)

    p = sub.add_parser("export", help="build a MONAI bundle (segmentation or survival) from a pretraining checkpoint",
                       description="Build a MONAI bundle that fine-tunes the checkpoint's encoder: SwinUNETR (Swin "
                       "encoders) or FlexibleUNet (ResNet encoders) for segmentation, SurvivalNet for survival. The "
                       "encoder weights are mapped to MONAI key names and loaded strictly; the bundle runs with "
                       "`python -m monai.bundle run` (see DIR/docs/README.md).")
    p.add_argument("checkpoint", type=Path, help="a pretraining checkpoint, e.g. RUN/checkpoints/last.pt")
    p.add_argument("--task", required=True, choices=["segmentation", "survival"])
    p.add_argument("--out", required=True, type=Path, help="bundle folder to create (must not exist or be empty)")
    p.add_argument("--network", choices=["swinunetr", "flexibleunet", "survivalnet"],
                   help="default: the one fitting the task and the checkpoint's encoder")
    p.add_argument("--manifest", type=Path, help="manifest the bundle fine-tunes on by default "
                   "(its entries' split: train/val/test); override at run time with --manifest")
    p.add_argument("--modality", choices=["CT", "MR"], default="CT", help="entries and preset the bundle uses")
    p.add_argument("--out-channels", type=int, help="segmentation: number of classes including background")
    p.add_argument("--roi", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="crop size for fine-tuning (default: the pretraining crop; SwinUNETR needs >= 64)")
    p.add_argument("--weights", choices=["model", "ema"], default="model",
                   help="export the trained weights or their moving average (if the run kept one)")
    p.set_defaults(run=_cmd_export)

    p = sub.add_parser("evaluate", help="evaluate a pretrained encoder: label efficiency against scratch, "
                       "frozen-feature probes against random initialisation")
    esub = p.add_subparsers(dest="evaluate_command", metavar="ACTION")
    esub.required = True
    q = esub.add_parser("label-efficiency", help="fine-tune pretrained vs scratch on fractions of the labelled "
                        "subjects, several seeds; score each on the val split",
                        description="Export the checkpoint as a bundle (OUT/bundle) once; then for every seed and "
                        "fraction draw that fraction of the labelled training subjects (split train; all scans of a "
                        "subject together; smaller fractions nested in larger ones) and fine-tune the bundle's "
                        "train.json on them twice, from the pretrained encoder and from scratch, with the same "
                        "seed and step budget. Each run's final weights are scored on the fixed val split (Dice "
                        "over foreground classes, or C-index). Writes OUT/results.json and OUT/label_efficiency.png "
                        "and prints mean ± sd over seeds per fraction and arm.")
    q.add_argument("--pretrained", required=True, type=Path, metavar="CKPT",
                   help="a pretraining checkpoint, e.g. RUN/checkpoints/last.pt")
    q.add_argument("--manifest", required=True, type=Path,
                   help="volpre manifest: split train is sampled by subject, split val scores every run")
    q.add_argument("--fractions", required=True,
                   help="comma-separated fractions in (0, 1] of the labelled training subjects, e.g. 0.1,0.25,1.0")
    q.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default: 3)")
    q.add_argument("--max-steps", type=int, help="optimiser steps per run (default: the bundle's max_epochs, "
                   "so smaller fractions take fewer steps)")
    q.add_argument("--task", choices=["segmentation", "survival"], default="segmentation")
    q.add_argument("--network", choices=["swinunetr", "flexibleunet", "survivalnet"],
                   help="default: the one fitting the task and the checkpoint's encoder")
    q.add_argument("--modality", choices=["CT", "MR"], default="CT", help="entries and preset the runs use")
    q.add_argument("--out-channels", type=int, help="segmentation: number of classes including background "
                   "(3 for the demo data)")
    q.add_argument("--roi", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="crop size for fine-tuning (default: the pretraining crop; SwinUNETR needs >= 64)")
    q.add_argument("--out", required=True, type=Path, help="folder to create (must not exist or be empty)")
    q.add_argument("overrides", nargs="*", metavar="key=value",
                   help="bundle config overrides for every run, e.g. num_workers=0 learning_rate=3e-4")
    q.set_defaults(run=_cmd_evaluate_label_efficiency)
    q = esub.add_parser("probe", help="frozen-feature probe: the checkpoint's encoder vs the same encoder at random "
                        "initialisation (seconds to minutes for tiny encoders)",
                        description="Extract frozen features of the labelled train and val entries (preprocessed "
                        "with the checkpoint's own preprocess config) with the checkpoint's encoder and with the same "
                        "architecture at random initialisation (seed s for seed s), fit a light head on train and "
                        "score it on val. Segmentation: a linear 1x1x1 head on all five feature maps, upsampled; mean "
                        "foreground Dice and Dice per class (MONAI compute_dice). Survival: an L2-penalised Cox model "
                        "on pooled features (plus covariates); Harrell's C-index. Writes OUT/results.json and prints "
                        "mean ± sd over seeds per arm.")
    q.add_argument("--pretrained", required=True, type=Path, metavar="CKPT",
                   help="a pretraining checkpoint, e.g. RUN/checkpoints/last.pt")
    q.add_argument("--manifest", required=True, type=Path,
                   help="volpre manifest with labelled entries: split train fits the head, split val scores it")
    q.add_argument("--out", required=True, type=Path, help="folder to create (must not exist or be empty)")
    q.add_argument("--task", choices=["segmentation", "survival"], default="segmentation")
    q.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default: 3)")
    q.add_argument("--modality", choices=["CT", "MR"], default="CT", help="entries probed (default: CT)")
    q.add_argument("--weights", choices=["model", "ema"], default="model",
                   help="the checkpoint's trained weights or their moving average (if the run kept one)")
    q.add_argument("--max-entries", type=int, help="at most this many entries of each split, in manifest order "
                   "(default: all)")
    q.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    q.set_defaults(run=_cmd_evaluate_probe)

    p = sub.add_parser("demo", help="run the whole path on the demo data (a few minutes on a CPU)",
                       description="Demo data -> index -> check -> pretrain a tiny encoder -> export a segmentation "
                       "and a survival bundle -> fine-tune each with `python -m monai.bundle run`, pretrained and "
                       "from scratch -> a summary table (a tiny smoke run, not evidence), also in OUT/report.md.")
    p.add_argument("--out", type=Path, default=Path("demo_run"),
                   help="output folder (default demo_run; an earlier demo there is replaced)")
    p.add_argument("--subjects", type=int, default=16, help="demo subjects to generate (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo data (default 0)")
    p.add_argument("--pretrain-steps", type=int, default=60, help="pretraining steps (default 60)")
    p.add_argument("--segmentation-epochs", type=int, help="fine-tuning epochs of each segmentation arm (default 10)")
    p.add_argument("--survival-epochs", type=int,
                   help="fine-tuning epochs of each survival arm (default 30; one optimiser step each on the demo data)")
    p.set_defaults(run=_cmd_demo)

    p = sub.add_parser("bench", help="benchmarks: data throughput, training step breakdown, benchmark volumes")
    bsub = p.add_subparsers(dest="bench_command", metavar="ACTION")
    bsub.required = True
    q = bsub.add_parser("data", help="random-crop throughput: plain MONAI, PersistentDataset, volpre cold and warm",
                        description="Measure, on the same CT NIfTI files, crops/s, seconds, peak memory and cache "
                        "size of (a) the plain MONAI pipeline, (b) the same with MONAI's PersistentDataset, (c) "
                        "volpre's loader building its cache and (d) volpre's loader on the built cache. Prints a "
                        "table with ratios against (a).")
    q.add_argument("manifest", type=Path)
    q.add_argument("--roi", required=True, metavar="R", help="crop size: one edge (64) or X,Y,Z (96,96,64)")
    q.add_argument("--workers", type=int, help="DataLoader workers of every pipeline (default: data.num_workers)")
    q.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    q.add_argument("--config", default="swin-dae", help="config whose preprocess and data sections apply "
                   "(default: swin-dae)")
    q.add_argument("--pipelines", help="comma-separated subset of reference,persistent,volpre_cold,volpre_warm "
                   "(default: all)")
    q.add_argument("--min-seconds", type=float, default=3.0, help="warm pipelines repeat passes until this long "
                   "(default: 3)")
    q.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. preprocess.spacing=[2,2,2]")
    q.set_defaults(run=_cmd_bench_data)
    q = bsub.add_parser("step", help="steady-state pretraining step: data wait, host-to-device, forward, backward, "
                        "optimizer", description="Time the phases of pretraining steps with the run's model, "
                        "optimizer and crop stream on a warm cache; print each phase's share and samples/s.")
    q.add_argument("--config", required=True, help="shipped config name or a YAML path")
    q.add_argument("--manifest", type=Path, help="default: the demo data (4 subjects), written to a temporary folder")
    q.add_argument("--steps", type=int, default=20, help="measured steps (default: 20)")
    q.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (default: 3)")
    q.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    q.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.num_workers=2")
    q.set_defaults(run=_cmd_bench_step)
    q = bsub.add_parser("ct-volumes", help="write CT volumes of realistic size for `bench data` (deterministic)",
                        description="Resample the demo CT phantoms to SHAPE voxels of SPACING mm, add 12 HU of "
                        "noise and write int16 .nii.gz files and OUT/manifest.json (ENTRIES entries cycling over "
                        "the VOLUMES files).")
    q.add_argument("out", type=Path)
    q.add_argument("--volumes", type=int, default=20)
    q.add_argument("--entries", type=int, help="manifest entries (default: one per volume)")
    q.add_argument("--shape", type=int, nargs=3, default=[256, 256, 200], metavar=("X", "Y", "Z"))
    q.add_argument("--spacing", type=float, nargs=3, default=[1.4, 1.4, 1.6], metavar=("X", "Y", "Z"))
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(run=_cmd_bench_ct_volumes)
    return parser


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input: reported in one line, without a traceback."""
    from volpre.config import ConfigError
    from volpre.data.errors import VolumeError
    from volpre.data.manifest import ManifestError

    types: list[type[BaseException]] = [UserError, ConfigError, ManifestError, VolumeError, FileNotFoundError]
    if "volpre.data.cache" in sys.modules:  # imported by the commands that can raise it
        types.append(sys.modules["volpre.data.cache"].CacheError)
    if "volpre.bench.data" in sys.modules:
        types.append(sys.modules["volpre.bench.data"].BenchError)
    if "volpre.engine.checkpoint" in sys.modules:  # imported by the commands that can raise it
        types.append(sys.modules["volpre.engine.checkpoint"].CheckpointError)
    if "volpre.export.weights" in sys.modules:
        types.append(sys.modules["volpre.export.weights"].WeightsError)
    return tuple(types)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may sit between options (argparse only takes them after the last one)
    stray = [token for token in extra if "=" not in token or token.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return int(args.run(args) or 0)
    except Exception as error:
        if not isinstance(error, _user_error_types()):
            raise
        print(f"volpre {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
