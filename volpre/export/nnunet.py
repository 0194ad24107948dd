"""``volpre export CKPT --task nnunet --out FILE.pth``: pretrained nnU-Net weights for ``nnUNetv2_train``.

``nnUNetv2_train DATASET CONFIGURATION FOLD -p PLANS -pretrained_weights FILE.pth`` builds the network
from the plans, then ``nnunetv2/run/load_pretrained_weights.py`` reads ``torch.load(FILE)["network_weights"]``
and asserts that every key of the network except those containing ``.seg_layers.`` is in it with the same
shape; it copies those and keeps its own segmentation heads. :func:`export_nnunet` writes exactly that
file from a pretraining checkpoint of the ``nnunet`` encoder:

- the keys are the network's own: the pretrainer's ``encoder.*`` and ``decoder.*`` (the network's
  encoder and decoder; ``decoder.encoder.*`` is the decoder's reference to the encoder, as in
  nnU-Net's own state dicts) without ``.seg_layers.`` (the reconstruction head);
- before writing, they are checked key by key against the network nnU-Net's code builds from the
  plans kept in the checkpoint (every missing, unexpected or misshapen key listed);
- ``FILE.md`` beside it says what the weights are and gives the exact ``nnUNetv2_train`` command, for the
  dataset and plans the checkpoint was pretrained with (nnU-Net must fine-tune with the same plans).

Both files appear atomically; existing files are never overwritten.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from volpre import __version__
from volpre.config import RunConfig
from volpre.data.nnunet_plan import NNUNetPlan
from volpre.engine.checkpoint import CheckpointError, checkpoint_run_config, load_checkpoint
from volpre.export.errors import ExportError
from volpre.files import OutputExistsError, atomic_torch_save, atomic_write_text
from volpre.models.nnunet import HEAD_KEY, pretraining_network, transferable_keys
from volpre.models.weights import check_state_dict

WEIGHT_PREFIXES: dict[str, str] = {"model": "", "ema": "module."}
"""Which weights of a checkpoint to export -> the prefix of the network's keys in that state dict."""


@dataclass(frozen=True)
class NNUNetExport:
    """What :func:`export_nnunet` wrote."""

    weights_file: Path
    readme: Path
    command: str
    """The ``nnUNetv2_train`` command (fold 0) that fine-tunes from ``weights_file``."""
    keys: int
    """Tensors in ``network_weights``."""


def _network_state(saved: dict[str, Any], weights: str, path: Path) -> dict[str, torch.Tensor]:
    if weights not in WEIGHT_PREFIXES:
        raise ExportError(f"weights: got {weights!r}, expected one of {', '.join(map(repr, WEIGHT_PREFIXES))}")
    source = saved["model"] if weights == "model" else saved.get("ema")
    if source is None:
        raise CheckpointError(f"checkpoint {path}: weights='ema' asked for, but the run kept no moving average "
                              "(train.ema_decay was 0); export weights='model'")
    prefix = WEIGHT_PREFIXES[weights]
    parts = (prefix + "encoder.", prefix + "decoder.")
    return {key[len(prefix):]: value for key, value in source.items() if key.startswith(parts)}


def read_nnunet_checkpoint(checkpoint: str | os.PathLike[str]) -> tuple[dict[str, Any], RunConfig, NNUNetPlan]:
    """The checkpoint, its config and the nnU-Net plan it kept, checked to be an ``nnunet`` pretraining run.

    Raises:
        CheckpointError: unreadable, invalid config, or no plans kept.
        ExportError: the checkpoint is of another encoder.
    """
    path = Path(checkpoint)
    saved = load_checkpoint(path)
    config = checkpoint_run_config(saved, path)
    if config.model.encoder != "nnunet":
        raise ExportError(f"--task nnunet needs a checkpoint of model.encoder nnunet; {path} holds a "
                          f"{config.model.encoder} encoder (export it as a MONAI bundle: --task segmentation or "
                          "survival)")
    plans = saved.get("nnunet_plans")
    if plans is None:
        raise CheckpointError(f"checkpoint {path}: an nnunet run without the nnU-Net plans it was trained with "
                              "(nnunet_plans); it was not written by volpre pretrain")
    return saved, config, NNUNetPlan.from_plans(plans, config.model.nnunet.configuration, f"checkpoint {path}")


def export_nnunet(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
                  weights: Literal["model", "ema"] = "model") -> NNUNetExport:
    """Write ``out`` (``{"network_weights": ...}`` for ``nnUNetv2_train -pretrained_weights``) and ``out``.md.

    Args:
        checkpoint: a ``volpre pretrain`` checkpoint of the ``nnunet`` encoder.
        out: the weights file to create (``.pth`` by nnU-Net's convention); ``out`` with suffix ``.md`` is the
            readme. Neither may exist.
        weights: ``"model"`` (trained weights) or ``"ema"`` (their moving average, when kept).

    Raises:
        CheckpointError: the checkpoint cannot be read or is not an nnunet pretraining checkpoint.
        WeightsError: its tensors do not fit the network nnU-Net builds from the kept plans (all differences).
        ExportError: the checkpoint is of another encoder, or ``weights`` is unknown.
        FileExistsError: ``out`` or its readme exists.
    """
    path, out = Path(checkpoint), Path(out)
    saved, config, plan = read_nnunet_checkpoint(path)
    readme = out.with_suffix(".md")
    for target in (out, readme):
        if target.exists():
            raise OutputExistsError(f"{target} exists; choose another --out (volpre never overwrites an export)")
    state = transferable_keys(_network_state(saved, weights, path))
    expected = transferable_keys(pretraining_network(plan).state_dict())
    check_state_dict(expected, state, source=f"checkpoint {path} ({weights} weights)",
                     target=f"the network nnU-Net builds from its plans ({plan.configuration}, keys without "
                            f"{HEAD_KEY!r})")
    out.parent.mkdir(parents=True, exist_ok=True)
    network_weights = {key: value.detach().clone().contiguous() for key, value in state.items()}
    provenance = {
        "volpre": __version__,
        "checkpoint": str(path.resolve()),
        "weights": weights,
        "step": int(saved["step"]),
        "objective": config.objective.name,
        "configuration": plan.configuration,
        "plans_name": str(plan.plans.get("plans_name", "nnUNetPlans")),
        "dataset_name": str(plan.plans.get("dataset_name", "")),
        "plans_sha256": plan.sha256,
    }
    atomic_torch_save({"network_weights": network_weights, "volpre_export": provenance}, out)
    command = train_command(plan, out.resolve(), fold="0")
    atomic_write_text(readme, _readme(out.resolve(), plan, config, saved, provenance, command))
    return NNUNetExport(weights_file=out, readme=readme, command=command, keys=len(network_weights))


def train_command(plan: NNUNetPlan, weights_file: Path, fold: str) -> str:
    """``nnUNetv2_train DATASET CONFIGURATION FOLD -p PLANS -pretrained_weights FILE`` for ``plan``."""
    dataset = str(plan.plans.get("dataset_name", "DATASET"))
    plans_name = str(plan.plans.get("plans_name", "nnUNetPlans"))
    return (f"nnUNetv2_train {shlex.quote(dataset)} {shlex.quote(plan.configuration)} {fold} "
            f"-p {shlex.quote(plans_name)} -pretrained_weights {shlex.quote(str(weights_file))}")


def _readme(weights_file: Path, plan: NNUNetPlan, config: RunConfig, saved: dict[str, Any],
            provenance: dict[str, Any], command: str) -> str:
    manifest = saved.get("manifest") or {}
    versions = ", ".join(f"{k} {v}" for k, v in sorted(saved.get("versions", {}).items()))
    dataset, plans_name = provenance["dataset_name"] or "DATASET", provenance["plans_name"]
    cpu = command.replace(" -pretrained_weights", " -device cpu -pretrained_weights")
    return f"""# Pretrained nnU-Net weights: {weights_file.name}

`{weights_file}` holds `{{"network_weights": state_dict}}` for nnU-Net v2's `-pretrained_weights`: the
{provenance['objective']} pretraining of the U-Net that the plans `{plans_name}` (dataset `{dataset}`,
configuration `{plan.configuration}`) describe, encoder *and* decoder, after {provenance['step']} optimiser
steps ({provenance['weights']} weights of `{provenance['checkpoint']}`). Every key of that network except
the segmentation heads (`.seg_layers.`) is in the file, so nnU-Net's unmodified `load_pretrained_weights`
loads it and keeps its own heads for your classes.

- Plans: SHA-256 of their canonical JSON `{provenance['plans_sha256']}`. Fine-tune with exactly these
  plans: nnU-Net rebuilds the network from `$nnUNet_preprocessed/{dataset}/{plans_name}.json`, and a
  different network refuses the file (nnU-Net names the first missing or misshapen key).
- Pretraining data: manifest `{manifest.get('path', 'not recorded')}` (SHA-256 `{manifest.get('sha256', 'not recorded')}`),
  preprocessed as the plans say (target spacing, per-channel normalisation), so pretraining saw the
  intensities nnU-Net will feed the network.
- Pretrained with {versions}; exported by volpre {provenance['volpre']}.

## Fine-tune

With `nnUNet_raw`, `nnUNet_preprocessed` and `nnUNet_results` set and the dataset preprocessed for
`{plan.configuration}` (`nnUNetv2_plan_and_preprocess` wrote these plans and preprocessed it), for fold 0:

```bash
{command}
```

Replace `0` by the fold (0-4, or `all`). On a machine without a GPU add `-device cpu`:

```bash
{cpu}
```

Check that the plans nnU-Net will use are the ones these weights were pretrained with:

```bash
python -c "import hashlib, json, sys; print(hashlib.sha256(json.dumps(json.load(open(sys.argv[1])), sort_keys=True).encode()).hexdigest())" \\
    "$nnUNet_preprocessed/{dataset}/{plans_name}.json"   # must print {provenance['plans_sha256']}
```
"""
