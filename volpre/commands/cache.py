"""``volpre cache``: preprocess every volume of a manifest once into the crop cache."""

from __future__ import annotations

import argparse
from pathlib import Path

from volpre.commands.options import (add_command, add_overrides_argument, add_progress_options, check_interval,
                                     check_workers)

CACHE_COLLECTIVE_TIMEOUT_H = 24
"""How long ranks that finished their share of ``volpre cache`` wait for the slowest one."""


def run(args: argparse.Namespace) -> int:
    import datetime

    from volpre.config import load_config
    from volpre.data.cache import CacheReport, VolumeCache, build_cache, cache_dir_for
    from volpre.data.manifest import load_manifest
    from volpre.engine.distributed import gather_objects, patient_group, setup_distributed, teardown_distributed
    from volpre.progress import Progress

    cfg = load_config(args.config, args.overrides)
    manifest = load_manifest(args.manifest)
    entries = manifest.select_splits(None if args.split is None else [args.split], option="--split")
    workers = check_workers(cfg.data.num_workers if args.workers is None else args.workers)
    every = check_interval(args.progress_every)
    cache = VolumeCache.create(cache_dir_for(cfg.data, args.manifest), cfg.preprocess)
    # one process, or one rank of many (torchrun, SLURM): each builds its own share of the sources
    ctx = setup_distributed("cpu")
    try:
        finish_line = patient_group(ctx, datetime.timedelta(hours=CACHE_COLLECTIVE_TIMEOUT_H))
        what = "caching" if ctx.world_size == 1 else f"caching (rank {ctx.rank} of {ctx.world_size})"
        meter = Progress(what, "source", every=every, enabled=not args.quiet)

        def show(result) -> None:
            if hasattr(result, "line"):
                print(result.line(), flush=True)

        report = build_cache(entries, cache, workers, on_result=show, rank=ctx.rank, world_size=ctx.world_size,
                             progress=meter)
        meter.close()
        merged = CacheReport.merge(gather_objects(ctx, report, group=finish_line))
    finally:
        teardown_distributed(ctx)
    if ctx.is_main:
        print(merged.summary())
    return 0 if merged.ok else 1


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "cache", run,
                    help="preprocess every volume once into the crop cache (exit 1 if any fails)",
                    description="""Run the deterministic preprocessing (checked read, RAS, resampling, foreground crop,
                    MR z-score) once per volume of a manifest and store it where pretraining reads its random crops
                    from (data.cache_dir; default: .volpre_cache beside the manifest). Existing entries are verified in
                    full; missing, stale (source, config or version changed) and corrupt ones are rebuilt, so a
                    relaunch after a kill builds only what is missing. `volpre pretrain` does the same on first use of
                    each volume. Under torchrun (one node or many: `torchrun --nnodes N --nproc_per_node P -m volpre
                    cache ...`) or SLURM (srun, one task per process) the ranks split the sources between them, each
                    built exactly once, and rank 0 prints one summary; every node must see the same cache folder. Exit
                    status 1 if a source is bad data; a cache that cannot be written (full disk, quota, read-only
                    filesystem) stops at once with one line, exit status 2.""")
    p.add_argument("manifest", type=Path)
    p.add_argument("--config", required=True, help="shipped config name or a YAML path (its preprocess and data "
                   "sections apply)")
    p.add_argument("--workers", type=int, help="processes building entries, per rank (default: data.num_workers)")
    p.add_argument("--split", help="cache only entries of this split (an error if no entry has it)")
    add_progress_options(p, "per rank ")
    add_overrides_argument(p, "config overrides, e.g. data.cache_dir=/scratch/c")
