"""Label-efficiency evaluation: the pretrained encoder vs scratch, at fractions of the labelled subjects.

- :func:`evaluate_label_efficiency` (``volpre evaluate label-efficiency``) exports the checkpoint
  as a bundle once, then fine-tunes it per (seed, fraction, arm) and scores each run on ``val``;
  writes ``results.json`` and ``label_efficiency.png``.
- :mod:`~volpre.evaluate.sampling`: the training pool, the fixed ``val`` set, nested subject subsets.
- :mod:`~volpre.evaluate.runs`: one run of the bundle's ``train.json`` through ``ConfigWorkflow``.
- :mod:`~volpre.evaluate.budget`: the Ignite handler that stops a run after N optimiser steps.
- :mod:`~volpre.evaluate.summary`: mean ± sd over seeds, the table, the plot.

Imports: errors, files, versions, config, data, models, survival, export (it fine-tunes exported
bundles); never the engine (which is handed the training probe, not importing this package) or
the commands.
"""

from volpre.evaluate.budget import StepBudget
from volpre.evaluate.errors import EvaluationError
from volpre.evaluate.label_efficiency import evaluate_label_efficiency, results_table
from volpre.evaluate.runs import parse_bundle_overrides
from volpre.evaluate.sampling import sample_subjects

__all__ = [
    "EvaluationError",
    "StepBudget",
    "evaluate_label_efficiency",
    "parse_bundle_overrides",
    "results_table",
    "sample_subjects",
]
