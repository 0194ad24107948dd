"""Swin encoder: the SwinViT of MONAI's SwinUNETR, with an entry point after the patch embedding.

:class:`SwinEncoder` *is* a :class:`monai.networks.nets.swin_unetr.SwinTransformer` built with the
arguments ``SwinUNETR`` passes to its ``swinViT``, so its ``state_dict()`` keys are exactly those of
``SwinUNETR(...).swinViT`` and export is a key prefix, not a rename table.

MONAI's ``SwinTransformer.forward`` has no entry point between the patch embedding and the Swin
stages, which SimMIM needs (it swaps masked patch embeddings for a learned token there), so the
forward pass is split into :meth:`SwinEncoder.embed` and :meth:`SwinEncoder.stages`. Their
composition is checked against ``SwinUNETR(...).swinViT`` in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.swin_unetr import MERGING_MODE, SwinTransformer
from torch import nn

from volpre.models.contract import check_encoder_input

PATCH_SIZE = 2
"""Edge of a Swin patch in voxels (SwinUNETR's default; the embedding sits at stride 2)."""


class SwinEncoder(SwinTransformer):
    """SwinViT returning five feature maps at strides 2, 4, 8, 16 and 32.

    Args:
        in_channels: input channels ``C``.
        feature_size: channels of the patch embedding; level ``i`` has ``feature_size * 2**i``.
        depths: Swin blocks per stage (4 stages).
        num_heads: attention heads per stage.
        window_size: edge of the cubic attention window, in tokens.
        use_v2: SwinUNETR-v2 residual convolution block before each stage.
        use_checkpoint: gradient checkpointing inside the Swin blocks.
        drop_path_rate: stochastic depth, rising linearly to this value over the blocks.
    """

    def __init__(
        self,
        in_channels: int,
        feature_size: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int,
        use_v2: bool,
        use_checkpoint: bool,
        drop_path_rate: float,
    ) -> None:
        # The same arguments SwinUNETR.__init__ gives its swinViT (MONAI 1.6.1), so the keys match.
        super().__init__(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=(window_size,) * 3,
            patch_size=(PATCH_SIZE,) * 3,
            depths=depths,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=drop_path_rate,
            norm_layer=nn.LayerNorm,
            patch_norm=False,
            use_checkpoint=use_checkpoint,
            spatial_dims=3,
            downsample=MERGING_MODE["merging"],
            use_v2=use_v2,
        )
        self.in_channels = in_channels
        self.feature_channels: tuple[int, ...] = tuple(feature_size * 2**level for level in range(5))
        """Channels of the five feature maps, finest (stride 2) first."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding: ``(B, C, X, Y, Z)`` float -> ``(B, feature_size, X/2, Y/2, Z/2)``."""
        check_encoder_input(x, self.in_channels)
        return self.pos_drop(self.patch_embed(x))

    def stages(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        """Swin stages on a patch embedding ``(B, feature_size, X/2, Y/2, Z/2)``.

        Returns five maps ``(B, feature_channels[i], X/2**(i+1), Y/2**(i+1), Z/2**(i+1))``, each
        layer-normalised over channels (no affine), as ``SwinUNETR`` consumes them.
        """
        stage_layers = (self.layers1, self.layers2, self.layers3, self.layers4)
        features = [self.proj_out(embedding, normalize=True)]
        x = embedding
        for index, stage in enumerate(stage_layers):
            if self.use_v2:
                x = getattr(self, f"layers{index + 1}c")[0](x.contiguous())
            x = stage[0](x.contiguous())
            features.append(self.proj_out(x, normalize=True))
        return features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        """``(B, C, X, Y, Z)`` float, X/Y/Z multiples of 32 -> five maps at strides 2..32."""
        return self.stages(self.embed(x))
