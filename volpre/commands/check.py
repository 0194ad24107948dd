"""``volpre check``: open every manifest entry and report its problems."""

from __future__ import annotations

import argparse
from pathlib import Path

from volpre.commands.options import add_command, add_progress_options, check_interval, check_workers


def run(args: argparse.Namespace) -> int:
    from volpre.data.check import check_entries
    from volpre.data.manifest import load_manifest
    from volpre.progress import Progress

    manifest = load_manifest(args.manifest)
    entries = manifest.select_splits(None if args.split is None else [args.split], option="--split")
    meter = Progress("checking", "entry", total=len(entries), every=check_interval(args.progress_every),
                     enabled=not args.quiet)
    bad: set[str] = set()

    def show(problem) -> None:
        bad.add(problem.entry_id)
        print(problem.line(), flush=True)

    report = check_entries(entries, on_problem=show, on_entry=lambda: meter.update(1, with_problems=len(bad)),
                           workers=check_workers(args.workers))
    meter.close()
    print(report.summary())
    return 0 if report.ok else 1


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "check", run, help="open every manifest entry and report problems (exit 1 if any)",
                    description="""Read every image and label of a manifest with all checks; print one line per problem
                    (entry id, file, cause), then a summary. Exit status 0 if all entries are good, 1 if any has a
                    problem, 2 if the manifest itself is bad (schema, non-finite numbers, unknown --split).""")
    p.add_argument("manifest", type=Path)
    p.add_argument("--split", help="check only entries of this split (an error if no entry has it)")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes reading entries in parallel (default 0: this process)")
    add_progress_options(p)
