"""Survival analysis on top of pretrained encoders: Cox loss, concordance index, survival network.

Shared layouts (:mod:`volpre.survival.layout`): risk ``(B,)`` or ``(B, 1)`` log-hazard (higher =
earlier event); label ``(B, 2)`` float with columns ``[time, event]`` (event 1 = observed,
0 = censored).

Imports: nothing of volpre (torch, numpy, MONAI, Ignite): the export and evaluation layers use it.
"""

from volpre.survival.concordance import concordance_index
from volpre.survival.cox import CoxPHLoss, cox_ph_loss
from volpre.survival.metric import ConcordanceIndex
from volpre.survival.network import SurvivalNet

__all__ = ["ConcordanceIndex", "CoxPHLoss", "SurvivalNet", "concordance_index", "cox_ph_loss"]
