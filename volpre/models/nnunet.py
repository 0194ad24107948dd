"""The ``nnunet`` encoder family: the U-Net nnU-Net v2 builds from a plans file, built by nnU-Net's own code.

:func:`build_nnunet_network` calls ``nnunetv2.utilities.get_network_from_plans.get_network_from_plans``
with the configuration's ``network_arch_class_name``, ``network_arch_init_kwargs`` and
``..._req_import`` and nnU-Net's initialisation (``allow_init=True``), exactly as
``nnUNetTrainer.build_network_architecture`` does, so the state dict keys and shapes are those
``nnUNetv2_train`` will build (``PlainConvUNet`` or ``ResidualEncoderUNet`` of
``dynamic_network_architectures``, or whatever the plan names).

For pretraining the network is built with ``num_classes = in_channels`` and no deep supervision:
its last segmentation layer (``decoder.seg_layers[-1]``, a 1^3 convolution) is the reconstruction
head, and the whole U-Net (encoder *and* nnU-Net's decoder) is pretrained, as Models Genesis did
with its U-Net. Export keeps every key except ``.seg_layers.`` (nnU-Net's loader skips those and
the fine-tuning network has its own number of classes there).

The encoder is ``network.encoder`` (``forward(x)`` -> the list of skips, finest first, at the plan's
strides); the decoder is ``network.decoder`` (skips -> ``(B, in_channels, *roi)``). They hold the same
tensors as the network, so ``{"encoder.*", "decoder.*"}`` keys of a pretrainer are the network's keys.
"""

from __future__ import annotations

import torch
from torch import nn

from volpre.data.nnunet_plan import NNUNetPlan

HEAD_KEY = ".seg_layers."
"""Substring of the keys nnU-Net's ``load_pretrained_weights`` does not transfer (the segmentation heads)."""


def build_nnunet_network(plan: NNUNetPlan, num_classes: int, deep_supervision: bool) -> nn.Module:
    """The network ``nnUNetTrainer`` builds for ``plan`` (on the CPU, freshly initialised as nnU-Net does).

    Args:
        plan: the plans and configuration.
        num_classes: output channels of the segmentation layers (``in_channels`` for reconstruction).
        deep_supervision: whether the decoder returns one output per stage (nnU-Net trains with it).

    The encoder gets ``feature_channels`` (its stages' channels, finest first), the attribute
    volpre's objectives read (e.g. for a contrastive projection head); it is not a tensor, so the
    state dict is unchanged.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    configuration = plan.configuration_manager()
    network = get_network_from_plans(
        configuration.network_arch_class_name,
        configuration.network_arch_init_kwargs,
        configuration.network_arch_init_kwargs_req_import,
        plan.in_channels,
        num_classes,
        allow_init=True,
        deep_supervision=deep_supervision,
    )
    for part in ("encoder", "decoder"):
        if not isinstance(getattr(network, part, None), nn.Module):
            raise TypeError(
                f"the nnU-Net plan {plan.source} ({plan.configuration}) builds {type(network).__name__}, which has no "
                f"{part} submodule; volpre pretrains nnU-Net's encoder-decoder U-Nets (PlainConvUNet, "
                "ResidualEncoderUNet)"
            )
    network.encoder.feature_channels = tuple(int(c) for c in network.encoder.output_channels)
    return network


def pretraining_network(plan: NNUNetPlan) -> nn.Module:
    """The network pretraining runs: ``num_classes = in_channels`` (reconstruction), no deep supervision.

    Without deep supervision only the last segmentation layer computes; the others are frozen
    (``requires_grad=False``) so that DDP finds no parameter without a gradient. Export leaves all of
    them out (:func:`transferable_keys`).
    """
    network = build_nnunet_network(plan, num_classes=plan.in_channels, deep_supervision=False)
    for unused in network.decoder.seg_layers[:-1]:
        unused.requires_grad_(False)
    return network


def transferable_keys(state: dict) -> dict:
    """The entries of a network state dict that nnU-Net's ``load_pretrained_weights`` transfers (no heads)."""
    return {key: value for key, value in state.items() if HEAD_KEY not in key}


def nnunet_embed(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The first map of an nnU-Net encoder (``PlainConvEncoder`` or ``ResidualEncoder``): its stem,
    if it has one, then its first stage. ``(B, C, *roi)`` -> ``(B, output_channels[0], *roi / strides[0])``.

    It plays the role of a patch embedding (the first learned map of the input) for the DAE's local
    masking; :func:`nnunet_stages` continues from it, and the two compose to ``encoder(x)``.
    """
    if getattr(encoder, "stem", None) is not None:
        x = encoder.stem(x)
    return encoder.stages[0](x)


def nnunet_stages(encoder: nn.Module, embedding: torch.Tensor) -> list[torch.Tensor]:
    """The encoder's skips, finest first, from :func:`nnunet_embed`'s map (which is the first skip)."""
    skips = [embedding]
    for stage in encoder.stages[1:]:
        skips.append(stage(skips[-1]))
    return skips
