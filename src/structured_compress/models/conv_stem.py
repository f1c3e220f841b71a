"""A convolutional patch embedding for ViTs on small images ("early convolutions help transformers see").

Three 3x3 convs (strides 1, 2, 2) replace the single stride-4 patchify conv: the same 7x7 token grid for
28x28 inputs, but with local inductive bias, so a small ViT trains to a useful accuracy in a few CPU epochs.
"""
from __future__ import annotations

from timm.layers import PatchEmbed
from torch import nn


class ConvStemPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` whose ``proj`` is a 3-conv stem with total stride 4 (patch size must be 4)."""

    def __init__(self, img_size=28, patch_size=4, in_chans=1, embed_dim=96, stem_channels: int = 24, **kwargs):
        if patch_size != 4:
            raise ValueError(f"ConvStemPatchEmbed downsamples by exactly 4; got patch_size={patch_size}")
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs)
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, stem_channels, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(stem_channels),
            nn.GELU(),
            nn.Conv2d(stem_channels, 2 * stem_channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * stem_channels),
            nn.GELU(),
            nn.Conv2d(2 * stem_channels, embed_dim, 3, stride=2, padding=1),
        )
