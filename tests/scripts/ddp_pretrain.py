"""Run under torchrun by tests/test_pretrain.py: pretrain a few steps with the real trainer, then
report, per rank, the dataset items it read, a checksum of its final weights and, per micro-batch,
whether DDP was to all-reduce its gradients (two micro-batches per step: only the second).

Usage: torchrun --standalone --nproc_per_node=2 tests/scripts/ddp_pretrain.py MANIFEST OUTPUT
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from volpre.config import load_config
from volpre.data import dataset as dataset_module
from volpre.engine.distributed import setup_distributed, teardown_distributed
from volpre.engine.trainer import Pretraining

manifest, output = Path(sys.argv[1]), Path(sys.argv[2])
items_read: list[list[int]] = []
original_getitem = dataset_module.PretrainDataset.__getitem__


def recording_getitem(self, key):
    items_read.append(list(key))
    return original_getitem(self, key)


dataset_module.PretrainDataset.__getitem__ = recording_getitem

cfg = load_config("resnet-dae-tiny", ["data.num_workers=0", "train.checkpoint_every=2", "train.grad_accum=2",
                                       "data.batch_size=1"])
ctx = setup_distributed("cpu")
run = Pretraining(cfg, manifest, output, ctx)
syncs: list[bool] = []
ddp = run.ddp
run.module.register_forward_pre_hook(lambda module, args, ddp=ddp: syncs.append(ddp.require_backward_grad_sync))
result = run.run(max_steps=3)
weights = torch.cat([p.detach().flatten() for p in run.module.parameters()])
gathered = [None] * ctx.world_size
dist.all_gather_object(gathered, {"rank": ctx.rank, "items": items_read, "weights": weights.double().sum().item(),
                                  "weights_abs": weights.double().abs().sum().item(), "syncs": syncs})
if ctx.is_main:
    (output / "ddp_report.json").write_text(json.dumps({"ranks": gathered, "losses": result.losses}))
del run, ddp  # DDP must release the process group before it is destroyed (see teardown_distributed)
teardown_distributed(ctx)
