"""The BEiT trunk: timm ``Beit`` (BEiT, BEiTv2 weights) driven as the official ``BEiTAdapter`` drives its BEiT.

What differs from the plain ViT (``TimmViTTrunk``), as the official code computes it:
- no absolute position embedding: each block adds its own relative-position bias, whose window is fixed at
  ``img_size // 16``, so the input must have the size the model was built for;
- the cls token is prepended before each interaction's blocks, split off after them and carried into the next
  interaction: the injector and extractor never see it;
- q/v biases (no k bias) and layer scale (``gamma_1``/``gamma_2``) are the blocks' own: timm runs them unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from timm.models.beit import Beit
from torch import Tensor

from adapterctl.layers.checkpointing import checkpointed
from adapterctl.models.trunks import register_trunk


@register_trunk(Beit)
class TimmBeitTrunk:
    """Not an ``nn.Module``: the BEiT keeps its timm parameter names (``vit.*``)."""

    def __init__(self, vit: Beit) -> None:
        patch = tuple(vit.patch_embed.proj.kernel_size)
        if patch != (16, 16):
            raise ValueError(f"BEiT-Adapter needs 16x16 patches, got {patch}")
        if vit.pos_embed is not None:
            raise ValueError("BEiT-Adapter runs BEiT with relative position bias only (use_abs_pos_emb=False)")
        self.vit = vit
        self.embed_dim = int(vit.embed_dim)
        self.depth = len(vit.blocks)
        self.patch_size = 16
        self.window = tuple(int(s) for s in vit.patch_embed.grid_size)

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        hw = (images.shape[-2] // 16, images.shape[-1] // 16)
        if hw != self.window:
            h, w = self.window
            raise ValueError(
                f"this BEiT-Adapter was built for {h * 16}x{w * 16} inputs (its relative-position window is {h}x{w} "
                f"tokens); got {images.shape[-2]}x{images.shape[-1]}. Use that crop size (slide inference does)"
            )
        tokens = self.vit.patch_embed(images)  # B, HW, D (no norm)
        cls = self.vit.cls_token.expand(images.shape[0], -1, -1)
        return self.vit.pos_drop(tokens), cls, hw

    def run_blocks(
        self, tokens: Tensor, prefix: Tensor, first: int, last: int, hw: tuple[int, int], checkpoint: bool
    ) -> tuple[Tensor, Tensor]:
        n = prefix.shape[1]
        x = torch.cat([prefix, tokens], dim=1)
        shared = self.vit.rel_pos_bias() if self.vit.rel_pos_bias is not None else None
        for block in self.vit.blocks[first : last + 1]:
            x = checkpointed(partial(block, shared_rel_pos_bias=shared), x, enabled=checkpoint)
        return x[:, n:], x[:, :n]

    def load_pretrained(self, path):
        """BEiT / BEiTv2 files, their tables resized to this window (``beit_pretrained.load_beit_weights``)."""
        from adapterctl.models.beit_pretrained import load_beit_weights

        return load_beit_weights(self.vit, path)

    def apply_window_attention(
        self, window_attn: Sequence[bool] | None, window_size: Sequence[int | None] | int | None
    ) -> None:
        if window_attn is not None and any(window_attn):
            raise ValueError("window attention is not available on BEiT blocks (the official detection copy is ViT)")
