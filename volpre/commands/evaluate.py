"""``volpre evaluate label-efficiency`` and ``probe``: a pretrained encoder against scratch and
against random initialisation."""

from __future__ import annotations

import argparse
from pathlib import Path

from volpre.commands.options import (UserError, add_actions, add_command, add_ct_window_option, add_device_option,
                                     add_network_option, add_overrides_argument, add_xyz_option, to_stderr)


def run_label_efficiency(args: argparse.Namespace) -> int:
    from volpre.evaluate import evaluate_label_efficiency, parse_bundle_overrides, results_table

    try:
        fractions = [float(text) for text in args.fractions.split(",")]
    except ValueError as error:
        raise UserError(f"--fractions: got {args.fractions!r}; expected comma-separated numbers in (0, 1], "
                        "e.g. 0.1,0.25,1.0") from error
    results = evaluate_label_efficiency(
        args.pretrained, args.manifest, args.out, args.task, fractions, args.seeds,
        max_steps=args.max_steps, network=args.network, modality=args.modality, out_channels=args.out_channels,
        roi_size=tuple(args.roi) if args.roi else None, ct_window=tuple(args.ct_window) if args.ct_window else None,
        overrides=parse_bundle_overrides(args.overrides), say=to_stderr)
    print(results_table(results))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'label_efficiency.png'}")
    return 0


def run_probe(args: argparse.Namespace) -> int:
    from volpre.evaluate.probe import compare_with_random_init, probe_table

    try:
        levels = [int(text) for text in args.levels.split(",")]
    except ValueError as error:
        raise UserError(f"--levels: got {args.levels!r}; expected comma-separated levels among 0-4, "
                        "e.g. 0,1,2,3,4 or 1") from error
    results = compare_with_random_init(args.pretrained, args.manifest, args.out, task=args.task,
                                       seeds=args.seeds, modality=args.modality, weights=args.weights,
                                       device=args.device, max_entries=args.max_entries, bn_stats=args.bn_stats,
                                       levels=levels, say=to_stderr)
    print(probe_table(results))
    print(f"wrote {args.out / 'results.json'}")
    return 0


def _add_pretrained_option(q: argparse.ArgumentParser) -> None:
    q.add_argument("--pretrained", required=True, type=Path, metavar="CKPT",
                   help="a pretraining checkpoint, e.g. RUN/checkpoints/last.pt")


def _add_task_option(q: argparse.ArgumentParser) -> None:
    q.add_argument("--task", choices=["segmentation", "survival"], default="segmentation")


def _add_out_option(q: argparse.ArgumentParser) -> None:
    q.add_argument("--out", required=True, type=Path, help="folder to create (must not exist or be empty)")


def add_parser(subparsers) -> None:
    esub = add_actions(subparsers, "evaluate", help="evaluate a pretrained encoder: label efficiency against "
                       "scratch, frozen-feature probes against random initialisation")
    _add_label_efficiency(esub)
    _add_probe(esub)


def _add_label_efficiency(esub) -> None:
    q = add_command(esub, "label-efficiency", run_label_efficiency,
                    help="fine-tune pretrained vs scratch on fractions of the labelled subjects, several seeds; "
                    "score each on the val split",
                    description="""Export the checkpoint as a bundle (OUT/bundle) once; then for every seed and
                    fraction draw that fraction of the labelled training subjects (split train; all scans of a subject
                    together; smaller fractions nested in larger ones) and fine-tune the bundle's train.json on them
                    twice, from the pretrained encoder and from scratch, with the same seed and step budget. Each run's
                    final weights are scored on the fixed val split (Dice over foreground classes, or C-index). Writes
                    OUT/results.json and OUT/label_efficiency.png and prints, per fraction, each arm's mean over seeds
                    and the paired difference pretrained - scratch, each with its 95% Student t interval over seeds. A
                    pretrained encoder gets a tenth of the head's learning rate, a scratch one the full rate (each
                    record says so); pass encoder_learning_rate=VALUE for equal rates.""")
    _add_pretrained_option(q)
    q.add_argument("--manifest", required=True, type=Path,
                   help="volpre manifest: split train is sampled by subject, split val scores every run")
    q.add_argument("--fractions", default="0.05,0.1,0.25,1.0",
                   help="comma-separated fractions in (0, 1] of the labelled training subjects, each at least one "
                   "subject (two for survival) (default: 0.05,0.1,0.25,1.0)")
    q.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default: 3; the 95%% intervals "
                   "need at least 2)")
    q.add_argument("--max-steps", type=int, help="optimiser steps per run (default: the bundle's max_epochs, "
                   "so smaller fractions take fewer steps)")
    _add_task_option(q)
    add_network_option(q)
    q.add_argument("--modality", choices=["CT", "MR"], default="CT", help="entries and preset the runs use")
    q.add_argument("--out-channels", type=int, help="segmentation: number of classes including background "
                   "(3 for the demo data)")
    add_xyz_option(q, "--roi", int, help="crop size for fine-tuning (default: the pretraining crop; SwinUNETR needs "
                   ">= 64)")
    add_ct_window_option(q, "CT fine-tuning window in HU (default: the pretraining window; e.g. -175 250, as "
                         "volpre export --ct-window)")
    _add_out_option(q)
    add_overrides_argument(q, "bundle config overrides for every run, e.g. num_workers=0 learning_rate=3e-4")


def _add_probe(esub) -> None:
    q = add_command(esub, "probe", run_probe, help="frozen-feature probe: the checkpoint's encoder vs the same encoder "
                    "at random initialisation (seconds to minutes for tiny encoders)",
                    description="""Extract frozen features of the labelled train and val entries (preprocessed with the
                    checkpoint's own preprocess config) with the checkpoint's encoder and with the same architecture at
                    random initialisation (seed s for seed s), fit a light head on train and score it on val.
                    Segmentation: a linear 1x1x1 head on all five feature maps (or --levels), upsampled; mean
                    foreground Dice and Dice per class (MONAI compute_dice). Survival: an L2-penalised Cox model on pooled features (plus
                    covariates); Harrell's C-index. Writes OUT/results.json and prints mean ± sd over seeds per
                    arm.""")
    _add_pretrained_option(q)
    q.add_argument("--manifest", required=True, type=Path,
                   help="volpre manifest with labelled entries: split train fits the head, split val scores it")
    _add_out_option(q)
    _add_task_option(q)
    q.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default: 3)")
    q.add_argument("--modality", choices=["CT", "MR"], default="CT", help="entries probed (default: CT)")
    q.add_argument("--weights", choices=["model", "ema"], default="model",
                   help="the checkpoint's trained weights or their moving average (if the run kept one)")
    q.add_argument("--max-entries", type=int, help="at most this many entries of each split, in manifest order "
                   "(default: all)")
    q.add_argument("--bn-stats", choices=["checkpoint", "train"], default="checkpoint",
                   help="BatchNorm running statistics of both arms: as they are (default; the pretraining's were "
                   "gathered on its disrupted or masked inputs), or recomputed on the train entries' images first "
                   "(encoders with BatchNorm: resnet)")
    q.add_argument("--levels", default="0,1,2,3,4",
                   help="comma-separated encoder levels the head reads, level i being the map at stride 2^(i+1) "
                   "(default: 0,1,2,3,4, all five; e.g. 1 to probe one level alone)")
    add_device_option(q)
