"""Pretraining objectives: disruptive autoencoder (``dae``), masked volume modeling (``mvm``), and
contrastive learning of augmented views (``simclr``) or of several scans of one subject (``micle``).

Imports: config, data (modality classes, items), models; never the engine that trains them.
"""

from volpre.objectives.base import ObjectiveOutput, Pretrainer, draw_and_forward
from volpre.objectives.contrastive import ContrastivePretrainer, ProjectionHead
from volpre.objectives.dae import DAEPretrainer
from volpre.objectives.factory import (
    MVM_VARIANTS,
    build_items,
    build_pretrainer,
    check_items_fit_objective,
    samples_by_subject,
)
from volpre.objectives.mvm import SimMIMPretrainer, SparKPretrainer

__all__ = [
    "MVM_VARIANTS",
    "ContrastivePretrainer",
    "DAEPretrainer",
    "ObjectiveOutput",
    "Pretrainer",
    "ProjectionHead",
    "SimMIMPretrainer",
    "SparKPretrainer",
    "build_items",
    "build_pretrainer",
    "check_items_fit_objective",
    "draw_and_forward",
    "samples_by_subject",
]
