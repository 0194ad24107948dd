"""How a bundle treats the pretrained encoder while fine-tuning: its own learning rate, and freezing.

- :func:`encoder_param_groups`: two optimiser parameter groups, the encoder (usually a lower
  learning rate, so fine-tuning does not wash the pretrained features out) and the rest of the
  network (decoder or risk head). A bundle's optimiser (the ``params`` expression is one line in
  the JSON file)::

      "optimizer": {
          "_target_": "torch.optim.AdamW",
          "params": "$volpre.export.finetune.encoder_param_groups(@network_def, @encoder_learning_rate,
                                                                  @learning_rate)",
          "lr": "@learning_rate", "weight_decay": "@weight_decay"}

- :class:`FreezeEncoder`: an Ignite handler that keeps the encoder frozen
  (``requires_grad=False``) during the first ``epochs`` epochs and unfreezes it afterwards. A
  frozen parameter gets no gradient, so AdamW leaves it (and its weight decay) alone. BatchNorm
  running statistics inside a frozen ResNet encoder still update, because MONAI's trainer puts
  the whole network in train mode every iteration. Under DDP the network must be wrapped with
  ``find_unused_parameters=True`` while some epochs are frozen (``multi_gpu_train.json`` does).
"""

from __future__ import annotations

import logging
from typing import Any

from ignite.engine import Engine, Events
from torch import nn

from volpre.export.errors import ExportError
from volpre.export.networks import encoder_of

log = logging.getLogger(__name__)


def encoder_param_groups(network: nn.Module, encoder_lr: float, lr: float) -> list[dict[str, Any]]:
    """``[{"params": encoder parameters, "lr": encoder_lr}, {"params": all other parameters, "lr": lr}]``.

    Every parameter of ``network`` is in exactly one group. ``network`` may be DDP-wrapped.

    Raises:
        TypeError: ``network`` is not one of the bundle networks.
        ExportError: a learning rate is not positive.
    """
    if encoder_lr <= 0 or lr <= 0:
        raise ExportError(f"learning rates must be > 0, got encoder_learning_rate={encoder_lr}, learning_rate={lr}")
    encoder_ids = {id(p) for p in encoder_of(network).parameters()}
    encoder_params = [p for p in network.parameters() if id(p) in encoder_ids]
    other_params = [p for p in network.parameters() if id(p) not in encoder_ids]
    return [
        {"params": encoder_params, "lr": encoder_lr, "name": "encoder"},
        {"params": other_params, "lr": lr, "name": "head"},
    ]


class FreezeEncoder:
    """Freeze the encoder of ``network`` for the first ``epochs`` epochs of a trainer, then unfreeze it.

    At the start of epoch ``e`` (1-based), the encoder's parameters get ``requires_grad = e > epochs``.
    Because it looks only at the epoch number, a resumed run freezes exactly as an uninterrupted one.
    ``epochs=0`` never freezes.

    Args:
        network: a bundle network (``SwinUNETR``, ``FlexibleUNet``, ``SurvivalNet``), possibly DDP-wrapped.
        epochs: number of leading epochs to keep the encoder frozen (>= 0).

    Raises:
        ExportError: ``epochs`` is negative.
        TypeError: ``network`` is not one of the bundle networks.
    """

    def __init__(self, network: nn.Module, epochs: int) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ExportError(f"freeze_encoder_epochs must be an integer >= 0, got {epochs!r}")
        self.encoder = encoder_of(network)
        self.epochs = epochs

    def attach(self, engine: Engine) -> None:
        """Run :meth:`__call__` at the start of every epoch of ``engine``."""
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        trainable = engine.state.epoch > self.epochs
        params = list(self.encoder.parameters())
        if any(p.requires_grad != trainable for p in params):
            for p in params:
                p.requires_grad_(trainable)
            log.info("epoch %d: encoder %s", engine.state.epoch, "unfrozen" if trainable else "frozen")
