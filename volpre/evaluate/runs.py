"""One fine-tuning run of an exported bundle, in-process, then its final weights scored on the val split.

There is one fine-tuning path in volpre: the bundle's own ``configs/train.json`` (networks,
transforms, loss, optimiser, trainer, evaluator). :func:`finetune_and_validate` drives it through
``monai.bundle.ConfigWorkflow`` with overrides that make one evaluation run of it:

- ``manifest``: the run's subset manifest (training subjects of one fraction and seed, plus the
  fixed ``val`` entries);
- ``pretrained``: ``True`` loads the exported encoder, ``False`` is the scratch arm. It is the only
  override that differs between the arms; through it the bundle also gives a pretrained encoder
  a 10x lower learning rate than the decoder (``encoder_learning_rate``; each record says which);
- ``ckpt_dir`` / ``output_dir``: the run's own folders, so runs never overwrite each other;
- ``seed``: the bundle's ``initialize`` calls ``monai.utils.set_determinism(seed=@seed)``, so
  both arms of a seed start from the same random state (same decoder initialisation, same
  crops and flips);
- ``max_epochs``: the step budget when one is given (every epoch has at least one step, so the
  budget, enforced by :class:`~volpre.evaluate.budget.StepBudget`, ends the run);
- ``lr_scheduler#T_max``: the step budget when one is given and the bundle has a step-level
  ``lr_scheduler`` (the segmentation bundle's cosine decay), so that the learning rates reach their
  end on the last step of every run, whatever its number of steps per epoch (the bundle's own
  ``T_max`` counts ``max_epochs`` full epochs, which a budget cuts short);
- ``val_interval``: ``max_epochs + 1``, so the bundle does not validate during training.

After training, the bundle's validation evaluator runs once on the final weights; its key metric
(``val_mean_dice``: MONAI ``MeanDice`` over foreground classes; ``val_cindex``: Harrell's C) is
the run's score, and its ``CheckpointSaver`` writes those weights to ``RUN/models/model.pt``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser, ConfigWorkflow

from volpre.evaluate.budget import StepBudget
from volpre.evaluate.errors import EvaluationError

RESERVED_KEYS: dict[str, str] = {
    "bundle_root": "the exported bundle's folder",
    "manifest": "each run's subset manifest",
    "dataset_dir": "each run's subset manifest",
    "train_split": "the evaluation's 'train' pool",
    "val_split": "the evaluation's fixed 'val' split",
    "train_records": "each run's training subjects",
    "val_records": "the evaluation's fixed 'val' split",
    "modality": "--modality",
    "in_channels": "the checkpoint",
    "out_channels": "--out-channels",
    "roi_size": "--roi",
    "preprocess": "the checkpoint's pretraining preprocessing",
    "ct_window": "--ct-window",
    "network_def": "the checkpoint and --network",
    "pretrained": "the arm of each run",
    "pretrained_encoder": "the arm of each run",
    "ckpt_dir": "each run's own folder",
    "output_dir": "each run's own folder",
    "val_interval": "the evaluation (it scores the final weights once, after training)",
    "seed": "the seed of each run",
    "initialize": "the bundle (it seeds each run from the 'seed' key)",
    "run": "the evaluation",
    "finalize": "the evaluation",
    "validate": "the bundle's validation (every run is scored the same way)",
    "train#trainer#max_epochs": "the top-level max_epochs (override that one)",
}
"""Bundle config keys (or their first ``#`` segment) that the evaluation sets itself -> what sets them."""


@dataclass(frozen=True)
class RunResult:
    """What one fine-tuning run gave."""

    metric_name: str
    """The bundle's key validation metric (``val_mean_dice`` or ``val_cindex``)."""
    metric: float
    """Its value for the final weights on the run's ``val`` entries."""
    steps: int
    """Optimiser steps actually taken."""
    encoder_learning_rate: float
    """The encoder's learning rate in this run (the bundle's ``encoder_learning_rate``)."""
    learning_rate: float
    """The rest of the network's (decoder or risk head) learning rate (the bundle's ``learning_rate``)."""


def parse_bundle_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["num_workers=0", "learning_rate=3e-4", "device=$torch.device('cpu')"]`` -> ``{key: value}``.

    A value is read as JSON when it parses (numbers, booleans, lists, ``null``), else kept as a
    string (MONAI expressions start with ``$``).

    Raises:
        EvaluationError: an item has no ``=`` or an empty key, or a key is given twice.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise EvaluationError(f"bundle override {item!r}: expected key=value, e.g. num_workers=0")
        if key in overrides:
            raise EvaluationError(f"bundle override {key!r}: given twice")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


def check_bundle_overrides(train_json: str | os.PathLike[str], overrides: Mapping[str, Any],
                           max_steps: int | None) -> None:
    """Refuse overrides the evaluation sets itself or the bundle config ``train_json`` does not have.

    Raises:
        EvaluationError: naming the key and why.
    """
    parser = _read_config(train_json)
    if "seed" not in parser:
        raise EvaluationError(f"bundle config {train_json} has no 'seed' key; the evaluation seeds each run through it "
                              "(re-export the bundle with this volpre)")
    for key in overrides:
        head = key.split("#", 1)[0]
        owner = RESERVED_KEYS.get(key) or RESERVED_KEYS.get(head)
        if owner is None and head == "max_epochs" and max_steps is not None:
            owner = "--max-steps (every run stops after that many optimiser steps)"
        if owner is None and key == "lr_scheduler#T_max" and max_steps is not None:
            owner = "--max-steps (the learning-rate schedule ends on a run's last step)"
        if owner is not None:
            raise EvaluationError(f"bundle override {key!r}: set by {owner}; remove the override")
        if key not in parser:
            raise EvaluationError(f"bundle override {key!r}: {train_json} has no such key (use '#' for nesting)")


def _read_config(path: str | os.PathLike[str]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(path))
    return parser


@dataclass(frozen=True)
class FinetuneRun:
    """One fine-tuning run of an exported bundle."""

    bundle: str | os.PathLike[str]
    """A bundle written by :func:`volpre.export.export_bundle`."""
    manifest: str | os.PathLike[str]
    """The run's manifest (its ``train`` and ``val`` entries are the run's data)."""
    pretrained: bool
    """Start the encoder from the exported weights (``True``) or from scratch."""
    seed: int
    """The run's seed (``monai.utils.set_determinism``)."""
    run_dir: str | os.PathLike[str]
    """The run's folder (``models/`` and ``eval/`` are created in it)."""
    max_steps: int | None
    """The step budget (sets ``max_epochs``); ``None``: the bundle's ``max_epochs``."""
    overrides: Mapping[str, Any]
    """Further bundle config overrides, applied to every run alike (checked by :func:`check_bundle_overrides`)."""


def run_workflow(run: FinetuneRun) -> ConfigWorkflow:
    """The bundle's ``train.json`` as an initialised ``ConfigWorkflow`` for ``run`` (nothing built or trained yet)."""
    bundle = Path(run.bundle)
    run_dir = Path(run.run_dir)
    run_overrides: dict[str, Any] = {
        **run.overrides,
        "bundle_root": str(bundle.resolve()),  # the bundle's own "." means the working directory
        "manifest": str(Path(run.manifest).resolve()),
        "pretrained": bool(run.pretrained),
        "ckpt_dir": str((run_dir / "models").resolve()),
        "output_dir": str((run_dir / "eval").resolve()),
        "seed": int(run.seed),
        "val_interval": "$@max_epochs + 1",
    }
    if run.max_steps is not None:
        run_overrides["max_epochs"] = int(run.max_steps)
        if "lr_scheduler" in _read_config(bundle / "configs" / "train.json"):
            run_overrides["lr_scheduler#T_max"] = int(run.max_steps)
    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / "train.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        **run_overrides,
    )
    workflow.initialize()
    return workflow


def finetune_and_validate(run: FinetuneRun) -> RunResult:
    """Fine-tune with the bundle's ``train.json`` on the run's manifest, then score the final weights on
    its ``val`` split.

    Trains until ``run.max_steps`` optimiser steps (or the bundle's ``max_epochs``), runs the
    bundle's validation evaluator once (which also saves the final weights as
    ``run.run_dir/models/model.pt``) and returns its key metric.
    """
    workflow = run_workflow(run)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    budget = StepBudget(run.max_steps)
    budget.attach(trainer, trainer.optimizer)
    workflow.run()
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    workflow.finalize()
    name = evaluator.state.key_metric_name
    return RunResult(
        metric_name=name,
        metric=float(evaluator.state.metrics[name]),
        steps=budget.steps,
        encoder_learning_rate=float(workflow.parser.get_parsed_content("encoder_learning_rate")),
        learning_rate=float(workflow.parser.get_parsed_content("learning_rate")),
    )
