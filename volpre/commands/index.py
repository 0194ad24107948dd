"""``volpre index``: walk folders and write a manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from volpre.commands.options import add_command, add_progress_options, check_interval, check_workers


def run(args: argparse.Namespace) -> int:
    from volpre.data.index import index_paths

    summary = index_paths(args.paths, args.out, modality=args.modality, progress=not args.quiet,
                          workers=check_workers(args.workers), progress_every=check_interval(args.progress_every))
    print(summary.describe())
    return 0


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "index", run,
                    help="walk folders and write a manifest (one entry per volume or DICOM series)",
                    description="""Walk folders of NIfTI/NRRD/MetaImage files and DICOM studies; write a manifest with
                    one entry per volume file or DICOM series (shape and spacing from headers; no pixel reads for
                    DICOM; the modality of other files from --modality rules, their JSON sidecar, BIDS suffix or
                    header, else their voxel values) and the files it could not use, with reasons: unreadable files and
                    folders, link loops, broken links, damaged headers, files whose modality nothing decides. None of
                    them stops the index.""")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="folders or files to index")
    p.add_argument("--out", required=True, type=Path, help="manifest to write (JSON)")
    p.add_argument("--modality", action="append", metavar="CODE|PATTERN=CODE",
                   help="modality of non-DICOM files, overriding what volpre decides from their JSON sidecar "
                   "(dcm2niix, BIDS), BIDS suffix (_T1w, _ct, ...), NRRD/MetaImage header or, last, voxel values "
                   "(air at -1000 HU means CT); DICOM series use their header. A code for all of them "
                   "(--modality CT), or rules matched against the path inside PATH, first match wins "
                   "(--modality '*/ct*=CT' --modality '*/mr*=MR'). Files nothing decides are rejected with "
                   "the reason")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes indexing folders in parallel (default 0: this process)")
    add_progress_options(p)
