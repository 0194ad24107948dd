"""What several commands share: the parser of a command or action (:func:`add_command`,
:func:`add_actions`), option declarations made the same way in more than one command, checks of
option values, and the error they raise (:class:`UserError`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from volpre.errors import UserInputError

BUNDLE_NETWORKS = ("swinunetr", "flexibleunet", "survivalnet")
"""``--network`` choices: the names of ``volpre.export.networks.NETWORKS``, written out so that
``--help`` imports neither torch nor MONAI (a test checks that the two agree)."""


class UserError(UserInputError):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""


def add_command(subparsers, name: str, run: Callable[[argparse.Namespace], int], help: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """The parser of command (or action) ``name``: ``help`` is its line in its parent's ``--help``,
    ``description`` heads its own (a paragraph: argparse folds its white space and wraps it to the
    terminal); ``run`` is stored in ``args.run``, which :func:`volpre.cli.main` calls."""
    p = subparsers.add_parser(name, help=help, description=description)
    p.set_defaults(run=run)
    return p


def add_actions(subparsers, name: str, help: str):
    """The parser of a command made of actions (``volpre bench data``, ``volpre bench step``, ...):
    returns the group each action is added to with :func:`add_command`. An action is required; its
    name is ``args.NAME_command``."""
    p = subparsers.add_parser(name, help=help)
    actions = p.add_subparsers(dest=f"{name}_command", metavar="ACTION")
    actions.required = True
    return actions


def add_overrides_argument(p: argparse.ArgumentParser, help: str) -> None:
    """The ``key=value`` overrides at the end of the command line; :func:`volpre.cli.main` adds to
    ``args.overrides`` those given between options."""
    p.add_argument("overrides", nargs="*", metavar="key=value", help=help)


def check_workers(workers: int) -> int:
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    return workers


def check_interval(seconds: float) -> float:
    if not seconds > 0:
        raise UserError(f"--progress-every must be > 0 seconds, got {seconds}")
    return seconds


def to_stderr(line: str) -> None:
    """Where a long command's own progress lines go (its results go to stdout)."""
    print(line, file=sys.stderr, flush=True)


def add_progress_options(p: argparse.ArgumentParser, each: str = "") -> None:
    p.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                   help=f"when stderr is not a terminal (a batch job's log), a progress line {each}this often "
                   "(default 30); on a terminal, a progress bar")
    p.add_argument("--quiet", action="store_true", help="no progress bar or lines")


def add_xyz_option(p: argparse.ArgumentParser, flag: str, type: type, **kwargs) -> None:
    """A 3-vector option (a crop size, a shape, a spacing), written the one way every command takes
    it: ``FLAG X Y Z``."""
    p.add_argument(flag, type=type, nargs=3, metavar=("X", "Y", "Z"), **kwargs)


def check_sizes(flag: str, values: list[int]) -> tuple[int, int, int]:
    """The values of an :func:`add_xyz_option` that counts voxels, each at least 1."""
    if any(v < 1 for v in values):
        raise UserError(f"{flag} takes three sizes X Y Z, each >= 1 (e.g. 96 96 64), got {' '.join(map(str, values))}")
    return tuple(values)


def add_network_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--network", choices=BUNDLE_NETWORKS,
                   help="default: the one fitting the task and the checkpoint's encoder")


def add_ct_window_option(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--ct-window", type=float, nargs=2, metavar=("LOW", "HIGH"), help=help)


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
