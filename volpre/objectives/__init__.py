"""Pretraining objectives: disruptive autoencoder (``dae``) and masked volume modeling (``mvm``)."""

from volpre.objectives.base import ObjectiveOutput, Pretrainer, draw_and_forward
from volpre.objectives.dae import DAEPretrainer
from volpre.objectives.factory import MVM_VARIANTS, build_pretrainer, samples_by_subject
from volpre.objectives.mvm import SimMIMPretrainer, SparKPretrainer

__all__ = [
    "MVM_VARIANTS",
    "DAEPretrainer",
    "ObjectiveOutput",
    "Pretrainer",
    "SimMIMPretrainer",
    "SparKPretrainer",
    "build_pretrainer",
    "draw_and_forward",
    "samples_by_subject",
]
