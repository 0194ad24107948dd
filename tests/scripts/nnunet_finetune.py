"""Child process of tests/test_nnunet.py: nnU-Net's own trainer loads volpre's export and trains from it.

Usage (nnUNet_raw, nnUNet_preprocessed, nnUNet_results and nnUNet_n_proc_DA set in the environment,
as nnU-Net reads them when it is imported)::

    python nnunet_finetune.py DATASET CONFIGURATION PLANS_NAME WEIGHTS.pth ITERATIONS REPORT.json

Does what ``nnUNetv2_train DATASET CONFIGURATION 0 -p PLANS_NAME -pretrained_weights WEIGHTS.pth -device
cpu`` does before training (nnU-Net's ``get_trainer_from_args`` and ``maybe_load_checkpoint``: the trainer
is built and ``initialize()``d, the file loaded with nnU-Net's unmodified ``load_pretrained_weights``),
then runs ITERATIONS of nnU-Net's ``train_step`` on its own data loader. Writes REPORT.json: the network's keys, which of them
equal the file's tensors after loading, the heads' keys, the losses, and whether training moved the
loaded weights, and whether anything imported ``timm``.
"""

from __future__ import annotations

import json
import sys

import torch


def main(argv: list[str]) -> int:
    dataset, configuration, plans_name, weights_file, iterations, report_file = argv
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    import volpre.data.nnunet_plan  # noqa: F401 - reported below: none of these may need timm
    import volpre.export.nnunet  # noqa: F401
    import volpre.objectives.spark_nnunet  # noqa: F401

    trainer = get_trainer_from_args(dataset, configuration, 0, "nnUNetTrainer", plans_name, device=torch.device("cpu"))
    trainer.initialize()
    network = trainer.network
    initial = {k: v.detach().clone() for k, v in network.state_dict().items()}
    maybe_load_checkpoint(trainer, continue_training=False, validation_only=False, pretrained_weights_file=weights_file)
    loaded = network.state_dict()
    ours = torch.load(weights_file, map_location="cpu", weights_only=True)["network_weights"]
    from_file = sorted(k for k in loaded if k in ours and torch.equal(loaded[k], ours[k]))
    heads = sorted(k for k in loaded if ".seg_layers." in k)
    heads_kept = all(torch.equal(loaded[k], initial[k]) for k in heads)

    trainer.on_train_start()
    losses = []
    for _ in range(int(iterations)):
        losses.append(float(trainer.train_step(next(trainer.dataloader_train))["loss"]))
    trained = network.state_dict()
    moved = sorted(k for k in ours if k in trained and trained[k].is_floating_point()
                   and not torch.equal(trained[k], ours[k]))
    trainer.on_train_end()
    report = {
        "network_keys": sorted(loaded),
        "file_keys": sorted(ours),
        "keys_equal_to_file": from_file,
        "head_keys": heads,
        "heads_kept_initialisation": heads_kept,
        "losses": losses,
        "trained_keys_moved": moved,
        "network_class": type(network).__name__,
        "timm_imported": "timm" in sys.modules,
    }
    with open(report_file, "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
