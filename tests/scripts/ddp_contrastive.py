"""Run under torchrun by tests/test_contrastive.py: pretrain each named contrastive config a few steps
with the real trainer in one process group, then report, per config and rank, the rows the
contrastive loss gathered, the BatchNorm layers' types, and a checksum of the
final weights.

Usage: torchrun --standalone --nproc_per_node=2 tests/scripts/ddp_contrastive.py MANIFEST OUTPUT STEPS CONFIG...
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from volpre.config import load_config
from volpre.engine.distributed import setup_distributed, teardown_distributed
from volpre.engine.trainer import Pretraining
from volpre.objectives import losses

manifest, output, steps, names = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
gathered_rows: list[list[int]] = []
original_gather = losses.gather_across_ranks


def recording_gather(x):
    out = original_gather(x)
    gathered_rows.append([x.shape[0], out.shape[0]])
    return out


losses.gather_across_ranks = recording_gather

ctx = setup_distributed("cpu")
report = {}
for name in names:
    gathered_rows.clear()
    cfg = load_config(name, ["data.num_workers=0", "train.checkpoint_every=1000"])
    run = Pretraining(cfg, manifest, output / name, ctx)
    result = run.run(max_steps=steps)
    norms = [m for m in run.module.modules() if isinstance(m, _BatchNorm)]
    weights = torch.cat([p.detach().flatten() for p in run.module.parameters()])
    mine = {
        "rank": ctx.rank,
        "gathered_rows": list(gathered_rows),
        "norm_types": sorted({type(m).__name__ for m in norms}),
        "weights": weights.double().sum().item(),
        "sync_batchnorm": run.sync_batchnorm,
    }
    ranks = [None] * ctx.world_size
    dist.all_gather_object(ranks, mine)
    report[name] = {"ranks": ranks, "losses": result.losses, "final_step": result.final_step}
    del run  # DDP must release the process group before it is destroyed (see teardown_distributed)
if ctx.is_main:
    (output / "ddp_contrastive.json").write_text(json.dumps(report))
teardown_distributed(ctx)
