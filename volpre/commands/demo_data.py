"""``volpre demo-data``: write the deterministic demo dataset and its manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from volpre.commands.options import add_command


def run(args: argparse.Namespace) -> int:
    from volpre.demo.synthetic import write_demo_data

    manifest = write_demo_data(Path(args.out), subjects=args.subjects, seed=args.seed, size=args.size)
    print(f"wrote demo data for {args.subjects} subjects ({args.size}); manifest: {manifest}")
    return 0


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "demo-data", run, help="write the small deterministic demo dataset and its manifest",
                    description="""Write synthetic CT torso and MR head phantoms (NIfTI, NRRD, MetaImage and DICOM
                    series), labels and survival outcomes, with OUT/manifest.json.""")
    p.add_argument("out", type=Path)
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=["full", "small"], default="full",
                   help="full: torso CTs (400 mm field of view) and head MRs; small: the same subjects with "
                   "liver-targeted CTs (160 mm field of view, 180 mm long) and MRs at twice the voxel size, "
                   "about 8 times smaller (default: full)")
