"""The ``volpre`` command (also ``python -m volpre``, which is what torchrun launches).

Each subcommand's arguments are declared here; its work lives in the module it names and is
imported only when the subcommand runs, so ``volpre --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from volpre import __version__
from volpre.errors import UserInputError

BUNDLE_NETWORKS = ("swinunetr", "flexibleunet", "survivalnet")
"""``--network`` choices: the names of ``volpre.export.networks.NETWORKS``, written out so that
``--help`` imports neither torch nor MONAI (a test checks that the two agree)."""


class UserError(UserInputError):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""


# ----------------------------------------------------------------------------- data


def _check_workers(workers: int) -> int:
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    return workers


def _check_interval(seconds: float) -> float:
    if not seconds > 0:
        raise UserError(f"--progress-every must be > 0 seconds, got {seconds}")
    return seconds


def _cmd_index(args: argparse.Namespace) -> int:
    from volpre.data.index import index_paths

    try:
        summary = index_paths(args.paths, args.out, modality=args.modality, progress=not args.quiet,
                              workers=_check_workers(args.workers),
                              progress_every=_check_interval(args.progress_every))
    except ValueError as error:
        raise UserError(str(error)) from error
    print(summary.describe())
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from volpre.data.check import check_entries
    from volpre.data.manifest import load_manifest
    from volpre.progress import Progress

    manifest = load_manifest(args.manifest)
    entries = manifest.select_splits(None if args.split is None else [args.split], option="--split")
    meter = Progress("checking", "entry", total=len(entries), every=_check_interval(args.progress_every),
                     enabled=not args.quiet)
    bad: set[str] = set()

    def show(problem) -> None:
        bad.add(problem.entry_id)
        print(problem.line(), flush=True)

    report = check_entries(entries, on_problem=show, on_entry=lambda: meter.update(1, with_problems=len(bad)),
                           workers=_check_workers(args.workers))
    meter.close()
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from volpre.demo.synthetic import write_demo_data

    try:
        manifest = write_demo_data(Path(args.out), subjects=args.subjects, seed=args.seed, size=args.size)
    except (ValueError, FileExistsError) as error:
        raise UserError(str(error)) from error
    print(f"wrote demo data for {args.subjects} subjects ({args.size}); manifest: {manifest}")
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


CACHE_COLLECTIVE_TIMEOUT_H = 24
"""How long ranks that finished their share of ``volpre cache`` wait for the slowest one."""


def _cmd_cache(args: argparse.Namespace) -> int:
    import datetime

    from volpre.config import load_config
    from volpre.data.cache import CacheReport, VolumeCache, build_cache, cache_dir_for
    from volpre.data.manifest import load_manifest
    from volpre.engine.distributed import gather_objects, patient_group, setup_distributed, teardown_distributed
    from volpre.progress import Progress

    cfg = load_config(args.config, args.overrides)
    manifest = load_manifest(args.manifest)
    entries = manifest.select_splits(None if args.split is None else [args.split], option="--split")
    workers = _check_workers(cfg.data.num_workers if args.workers is None else args.workers)
    every = _check_interval(args.progress_every)
    cache = VolumeCache.create(cache_dir_for(cfg.data, args.manifest), cfg.preprocess)
    # one process, or one rank of many (torchrun, SLURM): each builds its own share of the sources
    ctx = setup_distributed("cpu")
    try:
        finish_line = patient_group(ctx, datetime.timedelta(hours=CACHE_COLLECTIVE_TIMEOUT_H))
        what = "caching" if ctx.world_size == 1 else f"caching (rank {ctx.rank} of {ctx.world_size})"
        meter = Progress(what, "source", every=every, enabled=not args.quiet)

        def show(result) -> None:
            if hasattr(result, "line"):
                print(result.line(), flush=True)

        report = build_cache(entries, cache, workers, on_result=show, rank=ctx.rank, world_size=ctx.world_size,
                             progress=meter)
        meter.close()
        merged = CacheReport.merge(gather_objects(ctx, report, group=finish_line))
    finally:
        teardown_distributed(ctx)
    if ctx.is_main:
        print(merged.summary())
    return 0 if merged.ok else 1


# ----------------------------------------------------------------------------- training


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from volpre.config import load_config
    from volpre.engine.trainer import pretrain

    if args.config is None and not args.resume:
        raise UserError("--config is required (a shipped config name or a YAML path) unless --resume")
    cfg = load_config(args.config, args.overrides) if args.config is not None else None
    if cfg is None and args.overrides:
        raise UserError("key=value overrides need --config (with --resume, give the run's config too)")
    splits = None
    if args.splits is not None:
        splits = tuple(name.strip() for name in args.splits.split(",") if name.strip())
        if not splits:
            raise UserError(f"--splits: got {args.splits!r}; expected comma-separated split names, e.g. train,val")
    init = None if args.init is None else (args.init, args.init_format)
    if init is None and args.init_format != "auto":
        raise UserError("--init-format names the layout of an --init file; give --init PATH")
    if args.new_data and not args.resume:
        raise UserError("--new-data continues a run on changed data: it needs --resume")
    from volpre.evaluate.errors import EvaluationError
    from volpre.evaluate.probe import TrainingProbe

    try:
        result = pretrain(cfg, Path(args.manifest), Path(args.output), max_steps=args.max_steps,
                          resume=args.resume, device=args.device, splits=splits, init=init, new_data=args.new_data,
                          probe_factory=TrainingProbe)
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

    overrides = list(args.overrides)
    if args.amp is not None:
        overrides.append(f"train.amp={args.amp}")
    if args.compile:
        overrides.append("train.compile=true")
    cfg = load_config(args.config, overrides)
    if args.steps < 1 or args.warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    result = run_step_bench(cfg, args.manifest, args.steps, args.warmup, args.device, reference=args.reference,
                            say=lambda line: print(line, file=sys.stderr, flush=True))
    result["config"] = args.config
    print(format_step_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _cmd_bench_gpu(args: argparse.Namespace) -> int:
    import torch

    from volpre.bench.gpu import run_gpu_acceptance

    if args.steps < 1 or args.warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
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


def _cmd_export_nnunet(args: argparse.Namespace) -> int:
    from volpre.export.nnunet import export_nnunet

    bundle_only = {"--network": args.network, "--manifest": args.manifest, "--modality": args.modality,
                   "--out-channels": args.out_channels, "--roi": args.roi}
    given = [flag for flag, value in bundle_only.items() if value is not None]
    if given:
        raise UserError(f"{', '.join(given)}: bundle options; --task nnunet writes nnU-Net weights, whose network, "
                        "classes and patch size come from the nnU-Net plans")
    try:
        export = export_nnunet(args.checkpoint, args.out, weights=args.weights)
    except (ValueError, FileExistsError) as error:
        raise UserError(str(error)) from error
    print(f"wrote nnU-Net pretrained weights {export.weights_file} ({export.keys} tensors) and {export.readme}")
    print(f"fine-tune: {export.command}")
    return 0


def _export_source(args: argparse.Namespace):
    """The checkpoint path, or with ``--encoder-weights`` the weights read into ``--config``'s encoder."""
    from volpre.config import load_config
    from volpre.export.source import read_encoder_weights

    if (args.checkpoint is None) == (args.encoder_weights is None):
        raise UserError("give a pretraining checkpoint (volpre export CKPT ...) or --encoder-weights PATH "
                        "--config NAME, not both")
    if args.encoder_weights is None:
        if args.config is not None or args.set or args.init_format != "auto":
            raise UserError("--config, --set and --init-format describe --encoder-weights; a checkpoint carries "
                            "its own config")
        return args.checkpoint
    if args.config is None:
        raise UserError("--encoder-weights needs --config NAME_OR_YAML: the encoder the weights are for "
                        "(e.g. --config resnet-dae-tiny for MedicalNet's resnet_10, or --set model.resnet.depth=50)")
    if args.task == "nnunet" or args.weights != "model":
        raise UserError("--encoder-weights exports segmentation and survival bundles of the weights as they are "
                        "(no --task nnunet, no --weights ema)")
    return read_encoder_weights(args.encoder_weights, load_config(args.config, args.set), args.init_format)


def _cmd_export(args: argparse.Namespace) -> int:
    from volpre.export import export_bundle

    source = _export_source(args)
    if args.task == "nnunet":
        return _cmd_export_nnunet(args)
    try:
        bundle = export_bundle(source, args.task, args.out, network=args.network, manifest=args.manifest,
                               modality=args.modality or "CT", out_channels=args.out_channels,
                               roi_size=tuple(args.roi) if args.roi else None, weights=args.weights,
                               ct_window=tuple(args.ct_window) if args.ct_window else None)
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
            roi_size=tuple(args.roi) if args.roi else None, ct_window=tuple(args.ct_window) if args.ct_window else None,
            overrides=parse_bundle_overrides(args.overrides),
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
    from volpre.demo.run import DemoError, run_demo

    try:
        epochs = {"segmentation": args.segmentation_epochs, "survival": args.survival_epochs}
        run_demo(args.out, subjects=args.subjects, seed=args.seed, pretrain_steps=args.pretrain_steps,
                 epochs={task: n for task, n in epochs.items() if n is not None},
                 survival_subjects=args.survival_subjects)
    except DemoError as error:
        print(f"volpre demo: {error}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- parser


def _add_progress_options(p: argparse.ArgumentParser, each: str = "") -> None:
    p.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                   help=f"when stderr is not a terminal (a batch job's log), a progress line {each}this often "
                   "(default 30); on a terminal, a progress bar")
    p.add_argument("--quiet", action="store_true", help="no progress bar or lines")


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
                       "reads for DICOM; the modality of other files from --modality rules, their JSON sidecar, "
                       "BIDS suffix or header, else their voxel values) and the files it could not use, with "
                       "reasons: unreadable files and folders, link loops, broken links, damaged headers, files "
                       "whose modality nothing decides. None of them stops the index.")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="folders or files to index")
    p.add_argument("--out", required=True, type=Path, help="manifest to write (JSON)")
    p.add_argument("--modality", action="append", metavar="CODE|PATTERN=CODE",
                   help="modality of non-DICOM files, overriding what volpre decides from their JSON sidecar "
                   "(dcm2niix, BIDS), BIDS suffix (_T1w, _ct, ...), NRRD/MetaImage header or, last, voxel values "
                   "(air at -1000 HU means CT); DICOM series use their header. A code for all of them "
                   "(--modality CT), or rules matched against the path inside PATH, first match wins "
                   "(--modality '*/ct*=CT' --modality '*/mr*=MR'). Files nothing decides are rejected with "
                   "the reason")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes indexing folders in parallel (default 0: this process)")
    _add_progress_options(p)
    p.set_defaults(run=_cmd_index)

    p = sub.add_parser("check", help="open every manifest entry and report problems (exit 1 if any)",
                       description="Read every image and label of a manifest with all checks; print one line per "
                       "problem (entry id, file, cause), then a summary. Exit status 0 if all entries are good, "
                       "1 if any has a problem, 2 if the manifest itself is bad (schema, non-finite numbers, "
                       "unknown --split).")
    p.add_argument("manifest", type=Path)
    p.add_argument("--split", help="check only entries of this split (an error if no entry has it)")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes reading entries in parallel (default 0: this process)")
    _add_progress_options(p)
    p.set_defaults(run=_cmd_check)

    p = sub.add_parser("demo-data", help="write the small deterministic demo dataset and its manifest",
                       description="Write synthetic CT torso and MR head phantoms (NIfTI, NRRD, MetaImage and DICOM "
                       "series), labels and survival outcomes, with OUT/manifest.json.")
    p.add_argument("out", type=Path)
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=["full", "small"], default="full",
                   help="full: torso CTs (400 mm field of view) and head MRs; small: the same subjects with "
                   "liver-targeted CTs (160 mm field of view, 180 mm long) and MRs at twice the voxel size, "
                   "about 8 times smaller (default: full)")
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
                       "corrupt ones are rebuilt, so a relaunch after a kill builds only what is missing. "
                       "`volpre pretrain` does the same on first use of each volume. Under torchrun (one node or "
                       "many: `torchrun --nnodes N --nproc_per_node P -m volpre cache ...`) or SLURM (srun, one "
                       "task per process) the ranks split the sources between them, each built exactly once, "
                       "and rank 0 prints one summary; every node must see the same cache folder. Exit status 1 "
                       "if a source is bad data; a cache that cannot be written (full disk, quota, read-only "
                       "filesystem) stops at once with one line, exit status 2.")
    p.add_argument("manifest", type=Path)
    p.add_argument("--config", required=True, help="shipped config name or a YAML path (its preprocess and data "
                   "sections apply)")
    p.add_argument("--workers", type=int, help="processes building entries, per rank (default: data.num_workers)")
    p.add_argument("--split", help="cache only entries of this split (an error if no entry has it)")
    _add_progress_options(p, "per rank ")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.cache_dir=/scratch/c")
    p.set_defaults(run=_cmd_cache)

    p = sub.add_parser("pretrain", help="pretrain an encoder (one process, or many under torchrun)",
                       description="Pretrain an encoder on a manifest's volumes. Writes OUTPUT/metrics.jsonl, "
                       "OUTPUT/checkpoints/ (last.pt, best.pt, step_*.pt, each with a checksum verified on "
                       "load) and TensorBoard events under OUTPUT/tensorboard. A NaN/Inf loss stops the run "
                       "(exit 2) without writing a checkpoint, so the last one is finite; a full disk stops it "
                       "with one line. The same command runs under torchrun for DDP.")
    p.add_argument("--config", help="shipped config name (e.g. swin-dae, resnet-mvm-tiny) or a YAML path")
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--max-steps", type=int, help="stop after this optimiser step (default: train.total_steps); "
                   "the schedule always spans train.total_steps, so a stopped run resumes exactly")
    p.add_argument("--resume", action="store_true", help="continue the run in OUTPUT exactly, from checkpoints/last.pt "
                   "(or, if that is unreadable or damaged, the newest readable step_*.pt); refused if the manifest's "
                   "selected entries or the splits differ from the run's")
    p.add_argument("--new-data", action="store_true", help="with --resume: continue even though the data differ "
                   "(entries added, removed or changed, other splits); no longer an exact resume, recorded in "
                   "metrics.jsonl and the checkpoints")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--splits", help="comma-separated manifest splits to pretrain on (default: every entry; with "
                   "--resume: the run's own); a split no entry has is an error")
    p.add_argument("--init", type=Path, metavar="PATH", help="start the encoder from these weights (loaded strictly): "
                   "a volpre checkpoint, a volpre bundle (folder or models/pretrained_encoder.pt), MedicalNet "
                   "resnet_N_23dataset.pth (MONAI research-contributions' model_swinvit.pt is recognised and refused: "
                   "see the message)")
    p.add_argument("--init-format", default="auto", choices=["auto", "monai-swin-ssl", "medicalnet", "volpre", "bundle"],
                   help="layout of the --init file (default: recognised from the file)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")
    p.set_defaults(run=_cmd_pretrain)

    p = sub.add_parser("export", help="build a MONAI bundle (segmentation or survival) or nnU-Net weights from a "
                       "pretraining checkpoint",
                       description="Build a MONAI bundle that fine-tunes the checkpoint's encoder: SwinUNETR (Swin "
                       "encoders) or FlexibleUNet (ResNet encoders) for segmentation, SurvivalNet for survival. The "
                       "encoder weights are mapped to MONAI key names and loaded strictly (weights holding NaN or "
                       "Inf are refused); the bundle runs with `python -m monai.bundle run --bundle_root DIR ...` "
                       "(see DIR/docs/README.md). It is built beside DIR and renamed onto it when complete: an "
                       "interrupted export leaves no DIR. The bundle holds no local path: provenance as file names "
                       "and SHA-256 digests, bundle_root '.' (MONAI's convention), and a manifest path only if "
                       "--manifest is given. With --task nnunet (checkpoints of the nnunet encoder): write FILE.pth "
                       "for `nnUNetv2_train ... -pretrained_weights FILE.pth` and FILE.md with the exact command.")
    p.add_argument("checkpoint", type=Path, nargs="?", help="a pretraining checkpoint, e.g. RUN/checkpoints/last.pt")
    p.add_argument("--encoder-weights", type=Path, metavar="PATH", help="instead of a checkpoint: encoder weights "
                   "from elsewhere (a MedicalNet resnet_N_23dataset.pth, a volpre bundle), mapped and loaded "
                   "strictly into the encoder of --config, exported as they are (not pretrained by volpre; the "
                   "bundle docs say so)")
    p.add_argument("--config", metavar="NAME_OR_YAML", help="with --encoder-weights: the config whose model "
                   "and preprocess sections the bundle uses")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --encoder-weights: a config override, e.g. --set model.resnet.depth=50 (repeatable)")
    p.add_argument("--init-format", default="auto", choices=["auto", "medicalnet", "bundle"],
                   help="with --encoder-weights: layout of the file (default: recognised from the file)")
    p.add_argument("--task", required=True, choices=["segmentation", "survival", "nnunet"])
    p.add_argument("--out", required=True, type=Path, help="bundle folder to create (must not exist or be empty); "
                   "--task nnunet: the weights file to create (FILE.pth; FILE.md is written beside it)")
    p.add_argument("--network", choices=BUNDLE_NETWORKS,
                   help="default: the one fitting the task and the checkpoint's encoder")
    p.add_argument("--manifest", type=Path, help="manifest the bundle fine-tunes on by default (its entries' "
                   "split: train/val/test), written as an absolute path into train.json and inference.json; "
                   "leave it out for a bundle to share (runs then pass --manifest)")
    p.add_argument("--modality", choices=["CT", "MR"], help="entries and preset the bundle uses (default CT)")
    p.add_argument("--out-channels", type=int, help="segmentation: number of classes including background")
    p.add_argument("--roi", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="crop size for fine-tuning (default: the pretraining crop, raised to 64 per axis for "
                   "SwinUNETR, the smallest it trains on)")
    p.add_argument("--weights", choices=["model", "ema"], default="model",
                   help="export the trained weights or their moving average (if the run kept one)")
    p.add_argument("--ct-window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="CT fine-tuning intensity window in HU, clipped and scaled to [0, 1] (default: the "
                   "pretraining window; e.g. -175 250 for abdominal soft tissue, as MONAI's BTCV recipe)")
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
                        "and prints, per fraction, each arm's mean over seeds and the paired difference pretrained - "
                        "scratch, each with its 95% Student t interval over seeds. A pretrained encoder gets a "
                        "tenth of the head's learning rate, a scratch one the full rate (each record says so); "
                        "pass encoder_learning_rate=VALUE for equal rates.")
    q.add_argument("--pretrained", required=True, type=Path, metavar="CKPT",
                   help="a pretraining checkpoint, e.g. RUN/checkpoints/last.pt")
    q.add_argument("--manifest", required=True, type=Path,
                   help="volpre manifest: split train is sampled by subject, split val scores every run")
    q.add_argument("--fractions", default="0.05,0.1,0.25,1.0",
                   help="comma-separated fractions in (0, 1] of the labelled training subjects, each at least one "
                   "subject (two for survival) (default: 0.05,0.1,0.25,1.0)")
    q.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default: 3; the 95%% intervals "
                   "need at least 2)")
    q.add_argument("--max-steps", type=int, help="optimiser steps per run (default: the bundle's max_epochs, "
                   "so smaller fractions take fewer steps)")
    q.add_argument("--task", choices=["segmentation", "survival"], default="segmentation")
    q.add_argument("--network", choices=BUNDLE_NETWORKS,
                   help="default: the one fitting the task and the checkpoint's encoder")
    q.add_argument("--modality", choices=["CT", "MR"], default="CT", help="entries and preset the runs use")
    q.add_argument("--out-channels", type=int, help="segmentation: number of classes including background "
                   "(3 for the demo data)")
    q.add_argument("--roi", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="crop size for fine-tuning (default: the pretraining crop; SwinUNETR needs >= 64)")
    q.add_argument("--ct-window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="CT fine-tuning window in HU (default: the pretraining window; e.g. -175 250, as "
                   "volpre export --ct-window)")
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

    p = sub.add_parser("demo", help="run the whole path on the demo data (minutes on a CPU)",
                       description="Demo data -> index -> check -> pretrain a tiny encoder -> export a segmentation "
                       "and a survival bundle -> fine-tune each with `python -m monai.bundle run`, pretrained and "
                       "from scratch -> scores on the test split (Dice per class; C-index with its 95% bootstrap "
                       "interval and n), beside frozen-feature probes of the encoder against random initialisation "
                       "(volpre evaluate probe), in OUT/report.md and OUT/report.json. Synthetic data, one run per "
                       "arm.")
    p.add_argument("--out", type=Path, default=Path("demo_run"),
                   help="output folder (default demo_run; an earlier demo there is replaced)")
    p.add_argument("--subjects", type=int, default=16,
                   help="subjects of the full-size cohort: pretraining and segmentation (default 16)")
    p.add_argument("--survival-subjects", type=int, default=80,
                   help="subjects of the small survival cohort, 40%% of them the test split (default 80)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo data (default 0; survival cohort: seed + 1)")
    p.add_argument("--pretrain-steps", type=int, default=30, help="pretraining steps (default 30)")
    p.add_argument("--segmentation-epochs", type=int,
                   help="fine-tuning epochs of each segmentation arm (default 3; 8 optimiser steps each)")
    p.add_argument("--survival-epochs", type=int,
                   help="fine-tuning epochs of each survival arm (default 10; 3 optimiser steps each)")
    p.set_defaults(run=_cmd_demo)

    p = sub.add_parser("bench", help="benchmarks: data throughput, training step breakdown, GPU acceptance, "
                       "benchmark volumes")
    bsub = p.add_subparsers(dest="bench_command", metavar="ACTION")
    bsub.required = True
    q = bsub.add_parser("data", help="random-crop throughput: plain MONAI, PersistentDataset, volpre cold and warm",
                        description="Measure, on the same CT NIfTI files, crops/s, seconds, peak memory and cache "
                        "size of (a) the plain MONAI pipeline, (b) the same with MONAI's PersistentDataset, (c) "
                        "volpre's loader building its cache and (d) volpre's loader on the built cache. Prints a "
                        "table with ratios against (a).")
    q.add_argument("manifest", type=Path)
    q.add_argument("--roi", required=True, metavar="R", help="crop size: one edge (64) or X,Y,Z (96,96,64)")
    q.add_argument("--workers", type=int, help="DataLoader workers of every pipeline (default: data.num_workers; "
                   "at most the CPUs available to this process, as in training)")
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
                        "optimizer; FLOPs, peak memory; optionally against the MONAI Swin-SSL recipe",
                        description="Time the phases of pretraining steps with the trainer's own step, model, "
                        "optimizer and crop stream on a warm cache; print each phase's share, samples/s, FLOPs per "
                        "sample and peak device memory. --reference monai-swin-ssl also times the step of MONAI's "
                        "Swin-UNETR self-supervised recipe (rotation, contrastive and reconstruction heads) at the "
                        "same crop, batch and precision, and prints the ratio.")
    q.add_argument("--config", required=True, help="shipped config name or a YAML path")
    q.add_argument("--manifest", type=Path, help="default: the demo data (4 subjects), written to a temporary folder")
    q.add_argument("--steps", type=int, default=20, help="measured steps (default: 20)")
    q.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (default: 3)")
    q.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    q.add_argument("--amp", choices=["bf16", "fp16", "none"], help="autocast precision (train.amp; default: the "
                   "config's)")
    q.add_argument("--compile", action="store_true", help="torch.compile the step (train.compile=true)")
    q.add_argument("--reference", choices=["monai-swin-ssl"], help="also time this reference recipe's step; its "
                   "Swin needs crops with a side of 64+ and equal last two sides")
    q.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.num_workers=2")
    q.set_defaults(run=_cmd_bench_step)
    q = bsub.add_parser("gpu", help="GPU acceptance: every full-size config for a few steps, fp16, compile, "
                        "gradient checkpointing, the reference recipe, torchrun; one JSON",
                        description="Run each acceptance case in its own process (bench step of every shipped "
                        "full-size config at its real crop size in bf16; resnet-dae in fp16; swin-dae compiled, "
                        "with gradient checkpointing and against monai-swin-ssl; volpre pretrain under torchrun) "
                        "and write OUT/gpu_acceptance.json with samples/s, peak memory, first and last loss, FLOPs "
                        "and model FLOP utilisation, and each failure's traceback. Exit 1 if any case failed.")
    q.add_argument("--out", type=Path, required=True, help="folder for the JSON, the cases' logs and the demo data")
    q.add_argument("--steps", type=int, default=30, help="measured steps per case (default: 30)")
    q.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (default: 3)")
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
    q.set_defaults(run=_cmd_bench_gpu)
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may sit between options (argparse only takes them after the last one)
    stray = [token for token in extra if "=" not in token or token.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    _log_printably()
    try:
        return int(args.run(args) or 0)
    except Exception as error:
        if not isinstance(error, (UserInputError, FileNotFoundError)):  # the user's input: one line (volpre.errors)
            raise
        from volpre.text import printable_lines

        print(printable_lines(f"volpre {args.command}: error: {error}"), file=sys.stderr)
        return 2


def _log_printably() -> None:
    """Warnings go to stderr as Python's last-resort handler writes them, with control characters
    in them escaped (they quote entry ids and file names); nothing changes where logging is set up."""
    import logging

    from volpre.text import printable_lines

    class PrintableFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return printable_lines(super().format(record))

    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(PrintableFormatter())
        root.addHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
