"""The BEiT trunk: timm ``Beit`` (BEiT, BEiTv2 weights) driven as the official ``BEiTAdapter`` drives its BEiT.

What differs from the plain ViT (``TimmViTTrunk``), as the official code computes it:
- no absolute position embedding: each block adds its own relative-position bias, whose window is fixed at
  ``img_size // 16``, so the input must have the size the model was built for;
- the cls token is prepended before each interaction's blocks, split off after them and carried into the next
  interaction: the injector and extractor never see it;
- q/v biases (no k bias) and layer scale (``gamma_1``/``gamma_2``) are the blocks' own: timm runs them unchanged.

``interpolate_rel_pos`` (off by default) lets other input sizes through: each block's table is resized bicubically
to the input's window for that forward. That is not what the official code computes (it fails on such inputs).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.beit import Beit, gen_relative_position_index
from torch import Tensor, nn

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
        self._interpolate = False
        self._warned = False

    @property
    def interpolate_rel_pos(self) -> bool:
        """Whether inputs of another size run, with the tables resized (``build_beit_adapter`` sets it)."""
        return self._interpolate

    @interpolate_rel_pos.setter
    def interpolate_rel_pos(self, value: bool) -> None:
        self._interpolate = bool(value)
        self.vit.patch_embed.strict_img_size = not self._interpolate  # timm's own size check

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        hw = (images.shape[-2] // 16, images.shape[-1] // 16)
        if hw != self.window:
            h, w = self.window
            if not self.interpolate_rel_pos:
                raise ValueError(
                    f"this BEiT-Adapter was built for {h * 16}x{w * 16} inputs (its relative-position window is "
                    f"{h}x{w} tokens); got {images.shape[-2]}x{images.shape[-1]}. Use that crop size (slide inference "
                    "does), or model.interpolate_rel_pos=true (not the official computation)"
                )
            if not self._warned:
                warnings.warn(
                    f"BEiT-Adapter built for {h * 16}x{w * 16} runs a {images.shape[-2]}x{images.shape[-1]} input with "
                    "its relative-position tables resized bicubically: not the official computation",
                    stacklevel=2,
                )
                self._warned = True
        tokens = self.vit.patch_embed(images)  # B, HW, D (no norm)
        cls = self.vit.cls_token.expand(images.shape[0], -1, -1)
        return self.vit.pos_drop(tokens), cls, hw

    def run_blocks(
        self, tokens: Tensor, prefix: Tensor, first: int, last: int, hw: tuple[int, int], checkpoint: bool
    ) -> tuple[Tensor, Tensor]:
        n = prefix.shape[1]
        x = torch.cat([prefix, tokens], dim=1)
        resized = tuple(hw) != self.window
        if resized and self.vit.rel_pos_bias is not None:
            raise ValueError("interpolate_rel_pos needs a table per block (use_shared_rel_pos_bias=False)")
        shared = self.vit.rel_pos_bias() if self.vit.rel_pos_bias is not None else None
        for block in self.vit.blocks[first : last + 1]:
            if resized and block.attn.relative_position_bias_table is not None:
                x = checkpointed(partial(_run_resized, block, tuple(hw)), x, enabled=checkpoint)
            else:
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


def resized_rel_pos_bias(attn: nn.Module, hw: tuple[int, int]) -> Tensor:
    """(1, heads, N, N) bias of a timm BEiT attention for an ``hw`` token window (N = h*w + 1): the table's
    (2H-1) x (2W-1) grid resized bicubically to (2h-1) x (2w-1), the three cls entries kept; differentiable."""
    table = attn.relative_position_bias_table
    wh, ww = attn.window_size
    h, w = hw
    heads = table.shape[1]
    grid = table[:-3].transpose(0, 1).reshape(1, heads, 2 * wh - 1, 2 * ww - 1)
    grid = F.interpolate(grid, size=(2 * h - 1, 2 * w - 1), mode="bicubic", align_corners=False)
    new = torch.cat([grid.reshape(heads, -1).transpose(0, 1), table[-3:]], 0)
    index = gen_relative_position_index((h, w), device=table.device)
    n = h * w + 1
    return new[index.view(-1)].view(n, n, heads).permute(2, 0, 1).unsqueeze(0)


def _run_resized(block: nn.Module, hw: tuple[int, int], x: Tensor) -> Tensor:
    """A timm BEiT block with its bias for ``hw``: passed as the shared bias while its own table is set aside."""
    attn = block.attn
    table = attn.relative_position_bias_table
    bias = resized_rel_pos_bias(attn, hw).to(x.dtype)
    attn.relative_position_bias_table = None
    try:
        return block(x, shared_rel_pos_bias=bias)
    finally:
        attn.relative_position_bias_table = table
