"""``volpre pretrain``: pretrain an encoder (one process, or many under torchrun)."""

from __future__ import annotations

import argparse
from pathlib import Path

from volpre.commands.options import UserError, add_command, add_device_option, add_overrides_argument


def run(args: argparse.Namespace) -> int:
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


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "pretrain", run, help="pretrain an encoder (one process, or many under torchrun)",
                    description="""Pretrain an encoder on a manifest's volumes. Writes OUTPUT/metrics.jsonl,
                    OUTPUT/checkpoints/ (last.pt, best.pt, step_*.pt, each with a checksum verified on load) and
                    TensorBoard events under OUTPUT/tensorboard. A NaN/Inf loss stops the run (exit 2) without writing
                    a checkpoint, so the last one is finite; a full disk stops it with one line. The same command runs
                    under torchrun for DDP.""")
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
    add_device_option(p)
    p.add_argument("--splits", help="comma-separated manifest splits to pretrain on (default: every entry; with "
                   "--resume: the run's own); a split no entry has is an error")
    p.add_argument("--init", type=Path, metavar="PATH", help="start the encoder from these weights (loaded strictly): "
                   "a volpre checkpoint, a volpre bundle (folder or models/pretrained_encoder.pt), MedicalNet "
                   "resnet_N_23dataset.pth (MONAI research-contributions' model_swinvit.pt is recognised and refused: "
                   "see the message)")
    p.add_argument("--init-format", default="auto", choices=["auto", "monai-swin-ssl", "medicalnet", "volpre", "bundle"],
                   help="layout of the --init file (default: recognised from the file)")
    add_overrides_argument(p, "config overrides, e.g. train.lr=1e-4")
