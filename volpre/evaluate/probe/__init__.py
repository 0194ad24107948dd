"""Probes of frozen encoder features: does a checkpoint's encoder carry information a light head can read?

- :func:`~volpre.evaluate.probe.compare.compare_with_random_init` (``volpre evaluate probe``): the
  checkpoint's frozen encoder against the same architecture at random initialisation, over seeds;
  writes ``results.json``.
- :class:`~volpre.evaluate.probe.training.TrainingProbe`: the same probe inside pretraining
  (the ``probe`` config section; ``volpre.engine.trainer`` calls it).
- :mod:`~volpre.evaluate.probe.data`: the labelled entries, preprocessed as the encoder saw them.
- :mod:`~volpre.evaluate.probe.features`: frozen multi-scale features (upsampled, or pooled).
- :mod:`~volpre.evaluate.probe.segmentation`: linear 1x1x1 head on all five maps (or chosen levels), Dice
  (MONAI ``compute_dice``).
- :mod:`~volpre.evaluate.probe.survival`: L2-penalised Cox model on pooled features, Harrell's C-index.
"""

from volpre.evaluate.probe.compare import build_probe, compare_with_random_init, probe_table
from volpre.evaluate.probe.data import ProbeData, ProbeVolume, load_probe_data
from volpre.evaluate.probe.segmentation import SegmentationProbe
from volpre.evaluate.probe.survival import SurvivalProbe
from volpre.evaluate.probe.training import TrainingProbe

__all__ = [
    "ProbeData",
    "ProbeVolume",
    "SegmentationProbe",
    "SurvivalProbe",
    "TrainingProbe",
    "build_probe",
    "compare_with_random_init",
    "load_probe_data",
    "probe_table",
]
