"""``volpre demo``: the whole path on the demo data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from volpre.commands.options import add_command


def run(args: argparse.Namespace) -> int:
    """Exit status 0; 1 if a step of the demo failed (a :class:`~volpre.demo.run.DemoError`: a
    fine-tuning run that failed or hung, problems ``volpre check`` found, scores it cannot read),
    as ``volpre check`` exits 1 for problems in the data; 2 (via :func:`volpre.cli.main`) for the
    user's input, as every command: an ``--out`` that is not a demo's, a number of subjects too small."""
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


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "demo", run, help="run the whole path on the demo data (minutes on a CPU)",
                    description="""Demo data -> index -> check -> pretrain a tiny encoder -> export a segmentation and
                    a survival bundle -> fine-tune each with `python -m monai.bundle run`, pretrained and from scratch
                    -> scores on the test split (Dice per class; C-index with its 95% bootstrap interval and n), beside
                    frozen-feature probes of the encoder against random initialisation (volpre evaluate probe), in
                    OUT/report.md and OUT/report.json. Synthetic data, one run per arm.""")
    p.add_argument("--out", type=Path, default=Path("demo_run"),
                   help="output folder (default demo_run; an earlier demo there is replaced)")
    p.add_argument("--subjects", type=int, default=16,
                   help="subjects of the full-size cohort: pretraining and segmentation (default 16)")
    p.add_argument("--survival-subjects", type=int, default=80,
                   help="subjects of the small survival cohort, 40%% of them the test split (default 80)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo data (default 0; survival cohort: seed + 1)")
    p.add_argument("--pretrain-steps", type=int, default=30, help="pretraining steps (default 30)")
    p.add_argument("--segmentation-epochs", type=int,
                   help="fine-tuning epochs of each segmentation arm (default 24; 8 optimiser steps each)")
    p.add_argument("--survival-epochs", type=int,
                   help="fine-tuning epochs of each survival arm (default 10; 3 optimiser steps each)")
