"""The Eva trunk: timm ``Eva`` (DINOv3, EVA-02) driven by the ViT-Adapter.

What differs from the plain ViT, as timm's own forward computes it:
- rotary position embeddings (``rope``) computed for the actual token grid of each input, so slide windows and
  multi-scale inference run at any size; ``rope_mixed`` models get their per-block embedding;
- an optional absolute position embedding, resampled per input like timm's dynamic-size forward;
- the cls token and register tokens carried between interactions (never seen by the injector or extractor);
  RoPE applies to the patch tokens only, so they stay after the prefix;
- SwiGLU MLPs, layer scale and q/k norms are the blocks' own: timm runs them unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from timm.models.eva import Eva
from torch import Tensor

from adapterctl.layers.checkpointing import checkpointed
from adapterctl.models.trunks import embed_with_prefix, patch_size_of, register_trunk


@register_trunk(Eva)
class TimmEvaTrunk:
    """Not an ``nn.Module``: the Eva keeps its timm parameter names (``vit.*``)."""

    def __init__(self, vit: Eva) -> None:
        kh = patch_size_of(vit)
        if vit.pos_embed is None and vit.rope is None:
            raise ValueError("this Eva has neither an absolute position embedding nor RoPE")
        self.vit = vit
        self.embed_dim = int(vit.embed_dim)
        self.depth = len(vit.blocks)
        self.patch_size = kh
        self.num_prefix = int(vit.num_prefix_tokens)

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        x, n, hw = embed_with_prefix(self.vit, images, self.patch_size, self.num_prefix)
        x = self.vit.norm_pre(x)
        return x[:, n:], (x[:, :n] if n else None), hw

    def rope(self, hw: tuple[int, int]) -> Tensor | None:
        """The rotary embedding of an ``hw`` token grid (None without RoPE)."""
        rope = self.vit.rope
        if rope is None:
            return None
        cached = getattr(rope, "feat_shape", None)
        if not getattr(rope, "_use_cached_embed", False) or tuple(cached) == tuple(hw):
            return rope.get_embed(shape=list(hw))
        # a RoPE built for one grid (timm without dynamic_img_size) caches that grid's embedding and ignores
        # other shapes; build the input's, as the dynamic-size model does (same bands, same reference grid)
        build = getattr(rope, "_build_embed_cat", None)
        if build is None:
            raise ValueError(
                f"{type(rope).__name__} only has its {tuple(cached)} grid; create the model with "
                "dynamic_img_size=True to run other input sizes"
            )
        return build(list(hw), rope.bands, augment=rope.training and getattr(rope, "aug_active", False))

    def run_blocks(
        self, tokens: Tensor, prefix: Tensor | None, first: int, last: int, hw: tuple[int, int], checkpoint: bool
    ) -> tuple[Tensor, Tensor | None]:
        n = 0 if prefix is None else prefix.shape[1]
        x = tokens if prefix is None else torch.cat([prefix, tokens], 1)
        rope = self.rope(hw)
        mixed = getattr(self.vit, "rope_mixed", False) and rope is not None
        for i in range(first, last + 1):
            r = rope[i] if mixed else rope
            x = checkpointed(partial(self.vit.blocks[i], rope=r), x, enabled=checkpoint)
        return x[:, n:], (x[:, :n] if n else None)

    def apply_window_attention(
        self, window_attn: Sequence[bool] | None, window_size: Sequence[int | None] | int | None
    ) -> None:
        if window_attn is not None and any(window_attn):
            raise ValueError("window attention is not available on Eva blocks")

    def load_pretrained(self, path):
        """timm-format Eva files (safetensors / .pth; DINOv3's and EVA-02's original key names go through timm's
        ``checkpoint_filter_fn``): a report of missing and unexpected keys."""
        from adapterctl.models.pretrained import load_eva_weights

        return load_eva_weights(self.vit, path)
