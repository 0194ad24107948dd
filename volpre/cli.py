"""The ``volpre`` command (also ``python -m volpre``, which is what torchrun launches).

This module only assembles: :func:`build_parser` adds each subcommand of :mod:`volpre.commands`
(its options and help are declared in its module, its work is imported only when it runs, so
``volpre --help`` stays fast) in the order ``volpre --help`` lists them; :func:`main` runs the
chosen one and reports errors in the user's input as one line, exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from volpre import __version__
from volpre.commands import bench, cache, check, demo, demo_data, evaluate, export, index, manifest, pretrain
from volpre.errors import UserInputError

COMMANDS = (index, check, demo_data, manifest, cache, pretrain, export, evaluate, demo, bench)
"""The command modules, in the order of ``volpre --help``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="volpre",
        description="Self-supervised pretraining of 3D CT/MRI encoders, exported as MONAI bundles.",
    )
    parser.add_argument("--version", action="version", version=f"volpre {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
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
