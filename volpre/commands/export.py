"""``volpre export``: a MONAI bundle, or nnU-Net weights (``--task nnunet``), from a pretraining
checkpoint or from encoder weights of elsewhere."""

from __future__ import annotations

import argparse
from pathlib import Path

from volpre.commands.options import UserError, add_command, add_ct_window_option, add_network_option, add_xyz_option


def _run_nnunet(args: argparse.Namespace) -> int:
    from volpre.export.nnunet import export_nnunet

    bundle_only = {"--network": args.network, "--manifest": args.manifest, "--modality": args.modality,
                   "--out-channels": args.out_channels, "--roi": args.roi}
    given = [flag for flag, value in bundle_only.items() if value is not None]
    if given:
        raise UserError(f"{', '.join(given)}: bundle options; --task nnunet writes nnU-Net weights, whose network, "
                        "classes and patch size come from the nnU-Net plans")
    export = export_nnunet(args.checkpoint, args.out, weights=args.weights)
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


def run(args: argparse.Namespace) -> int:
    from volpre.export import export_bundle

    source = _export_source(args)
    if args.task == "nnunet":
        return _run_nnunet(args)
    bundle = export_bundle(source, args.task, args.out, network=args.network, manifest=args.manifest,
                           modality=args.modality or "CT", out_channels=args.out_channels,
                           roi_size=tuple(args.roi) if args.roi else None, weights=args.weights,
                           ct_window=tuple(args.ct_window) if args.ct_window else None)
    print(f"wrote {args.task} bundle {bundle}")
    print(f"fine-tune: see {bundle / 'docs' / 'README.md'}")
    return 0


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "export", run,
                    help="build a MONAI bundle (segmentation or survival) or nnU-Net weights from "
                    "a pretraining checkpoint",
                    description="""Build a MONAI bundle that fine-tunes the checkpoint's encoder: SwinUNETR (Swin
                    encoders) or FlexibleUNet (ResNet encoders) for segmentation, SurvivalNet for survival. The encoder
                    weights are mapped to MONAI key names and loaded strictly (weights holding NaN or Inf are refused);
                    the bundle runs with `python -m monai.bundle run --bundle_root DIR ...` (see DIR/docs/README.md).
                    It is built beside DIR and renamed onto it when complete: an interrupted export leaves no DIR. The
                    bundle holds no local path: provenance as file names and SHA-256 digests, bundle_root '.' (MONAI's
                    convention), and a manifest path only if --manifest is given. With --task nnunet (checkpoints of
                    the nnunet encoder): write FILE.pth for `nnUNetv2_train ... -pretrained_weights FILE.pth` and
                    FILE.md with the exact command.""")
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
    add_network_option(p)
    p.add_argument("--manifest", type=Path, help="manifest the bundle fine-tunes on by default (its entries' "
                   "split: train/val/test), written as an absolute path into train.json and inference.json; "
                   "leave it out for a bundle to share (runs then pass --manifest)")
    p.add_argument("--modality", choices=["CT", "MR"], help="entries and preset the bundle uses (default CT)")
    p.add_argument("--out-channels", type=int, help="segmentation: number of classes including background")
    add_xyz_option(p, "--roi", int, help="crop size for fine-tuning (default: the pretraining crop, raised to 64 per "
                   "axis for SwinUNETR, the smallest it trains on)")
    p.add_argument("--weights", choices=["model", "ema"], default="model",
                   help="export the trained weights or their moving average (if the run kept one)")
    add_ct_window_option(p, "CT fine-tuning intensity window in HU, clipped and scaled to [0, 1] (default: the "
                         "pretraining window; e.g. -175 250 for abdominal soft tissue, as MONAI's BTCV recipe)")
