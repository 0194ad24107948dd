"""``volpre manifest from-decathlon`` and ``to-decathlon``: convert manifests to and from MONAI
decathlon datalists."""

from __future__ import annotations

import argparse
from pathlib import Path

from volpre.commands.options import add_actions, add_command


def run_from_decathlon(args: argparse.Namespace) -> int:
    from volpre.data.manifest import from_decathlon, save_manifest

    manifest = from_decathlon(args.datalist, base_dir=args.base_dir, modality=args.modality)
    save_manifest(manifest, args.out)
    print(f"wrote {len(manifest.entries)} entries to {args.out}")
    return 0


def run_to_decathlon(args: argparse.Namespace) -> int:
    from volpre.data.manifest import load_manifest, to_decathlon

    to_decathlon(load_manifest(args.manifest), args.out)
    print(f"wrote {args.out}")
    return 0


def add_parser(subparsers) -> None:
    msub = add_actions(subparsers, "manifest", help="convert manifests to and from MONAI decathlon datalists")
    q = add_command(msub, "from-decathlon", run_from_decathlon, help="decathlon datalist -> volpre manifest")
    q.add_argument("datalist", type=Path)
    q.add_argument("--out", required=True, type=Path)
    q.add_argument("--base-dir", type=Path, help="folder the datalist's paths are relative to (default: its own)")
    q.add_argument("--modality", help="modality of every entry (CT, MR, ...)")
    q = add_command(msub, "to-decathlon", run_to_decathlon,
                    help="volpre manifest -> decathlon datalist (train/val/test splits)")
    q.add_argument("manifest", type=Path)
    q.add_argument("--out", required=True, type=Path)
