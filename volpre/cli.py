"""The ``volpre`` command (also ``python -m volpre``, which is what torchrun launches).

Each subcommand's arguments are declared here; its work lives in the module it names and is
imported only when the subcommand runs, so ``volpre --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from volpre import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="volpre",
        description="Self-supervised pretraining of 3D CT/MRI encoders, exported as MONAI bundles.",
    )
    parser.add_argument("--version", action="version", version=f"volpre {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
