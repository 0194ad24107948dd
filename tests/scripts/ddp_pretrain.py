"""Run under torchrun by tests/test_pretrain.py: pretrain a few steps with the real trainer, then
report, per rank, the dataset items it read, a checksum of its final weights and, per micro-batch,
whether DDP was to all-reduce its gradients (two micro-batches per step: only the second).

Usage: torchrun --standalone --nproc_per_node=2 tests/scripts/ddp_pretrain.py MANIFEST OUTPUT [BACKEND]

With BACKEND (a torch.compile backend, e.g. ``aot_eager``), the run has ``train.compile=true`` and the
trainer's ``torch.compile`` uses that backend (inductor's C++ compilation takes minutes on a CPU).
"""

import functools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from volpre.config import load_config
from volpre.data import dataset as dataset_module
from volpre.engine.distributed import setup_distributed, teardown_distributed
from volpre.engine.trainer import Pretraining

manifest, output = Path(sys.argv[1]), Path(sys.argv[2])
compile_backend = sys.argv[3] if len(sys.argv) > 3 else None
if compile_backend is not None:
    torch.compile = functools.partial(torch.compile, backend=compile_backend)
items_read: list[list[int]] = []
original_getitem = dataset_module.PretrainDataset.__getitem__


def recording_getitem(self, key):
    items_read.append(list(key))
    return original_getitem(self, key)


dataset_module.PretrainDataset.__getitem__ = recording_getitem

cfg = load_config("resnet-dae-tiny", ["data.num_workers=0", "train.checkpoint_every=2", "train.grad_accum=2",
                                       "data.batch_size=1"] + (["train.compile=true"] if compile_backend else []))
ctx = setup_distributed("cpu")
run = Pretraining(cfg, manifest, output, ctx)
syncs: list[bool] = []
ddp = run.ddp
# read during backward (eager autograd, also under compile), inside the step's no_sync() when there is one
next(run.module.parameters()).register_post_accumulate_grad_hook(
    lambda param, ddp=ddp: syncs.append(ddp.require_backward_grad_sync))
result = run.run(max_steps=3)
weights = torch.cat([p.detach().flatten() for p in run.module.parameters()])
gathered = [None] * ctx.world_size
dist.all_gather_object(gathered, {"rank": ctx.rank, "items": items_read, "weights": weights.double().sum().item(),
                                  "weights_abs": weights.double().abs().sum().item(), "syncs": syncs})
if ctx.is_main:
    (output / "ddp_report.json").write_text(json.dumps({"ranks": gathered, "losses": result.losses,
                                                        "graph_breaks": dict(counters["graph_break"])}))
del run, ddp  # DDP must release the process group before it is destroyed (see teardown_distributed)
teardown_distributed(ctx)
