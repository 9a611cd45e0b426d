"""The BEiT trunk: timm ``Beit`` (BEiT, BEiTv2 weights) driven as the official ``BEiTAdapter`` drives its BEiT.

What differs from the plain ViT (``TimmViTTrunk``), as the official code computes it:
- no absolute position embedding: each block adds its own relative-position bias, whose window is fixed at
  ``img_size // 16``, so the input must have the size the model was built for;
- the cls token is prepended before each interaction's blocks, split off after them and carried into the next
  interaction: the injector and extractor never see it;
- q/v biases (no k bias) and layer scale (``gamma_1``/``gamma_2``) are the blocks' own: timm runs them unchanged.

``interpolate_rel_pos`` (off by default) lets other input sizes through: each block's table is resized bicubically
to the input's window for that forward. That is not what the official code computes (it fails on such inputs).

The detection copy (``apply_window_attention`` with windows: the official ``detection/.../base/beit.py``, which
HTC++ BEiT-Adapter-L runs) differs again: no cls token at all, and each block attends within its own square
window (14, or 56 at the end of each interaction group), its relative-position table sized for that window with
no cls rows. Windows are taken after ``norm1`` on the map zero-padded at the bottom/right to a multiple of the
window; the padded (zero) tokens take part in every window's attention as the official code lets them.
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
        self.windows: list[int | None] | None = None  # the detection copy's per-block windows (None: segmentation)

    @property
    def interpolate_rel_pos(self) -> bool:
        """Whether inputs of another size run, with the tables resized (``build_beit_adapter`` sets it)."""
        return self._interpolate

    @interpolate_rel_pos.setter
    def interpolate_rel_pos(self, value: bool) -> None:
        self._interpolate = bool(value)
        # timm's own size check; the detection copy's windows take any size
        self.vit.patch_embed.strict_img_size = not (self._interpolate or self.windows is not None)

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        hw = (images.shape[-2] // 16, images.shape[-1] // 16)
        if self.windows is not None:  # the detection copy: any size, no cls token
            tokens = self.vit.patch_embed(images).contiguous()  # a transposed view otherwise (see TimmViTTrunk)
            return self.vit.pos_drop(tokens), tokens.new_zeros(tokens.shape[0], 0, tokens.shape[2]), hw
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
        if self.windows is not None:
            for i in range(first, last + 1):
                run = partial(_window_block, self.vit.blocks[i], tuple(hw), self.windows[i])
                tokens = checkpointed(run, tokens, enabled=checkpoint)
            return tokens, prefix
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
        """The detection copy (module docstring): every block windowed, ``window_size`` per block (or one for
        all); each block's table is replaced by one for its window, without cls rows, and the cls token goes."""
        if window_attn is None or not any(window_attn):
            return
        sizes = [window_size] * self.depth if not isinstance(window_size, Sequence) else list(window_size)
        if not all(window_attn) or len(sizes) != self.depth or any(s is None or int(s) < 1 for s in sizes):
            raise ValueError(
                "the BEiT detection copy windows every block: window_attn all true and a window_size per block "
                f"({self.depth}), got window_attn={list(window_attn)}, window_size={sizes}"
            )
        if self.vit.rel_pos_bias is not None:
            raise ValueError("the BEiT detection copy needs a table per block (use_shared_rel_pos_bias=False)")
        self.windows = [int(s) for s in sizes]
        for block, w in zip(self.vit.blocks, self.windows, strict=True):
            attn = block.attn
            heads = attn.relative_position_bias_table.shape[1]
            attn.window_size = (w, w)
            attn.relative_position_bias_table = nn.Parameter(torch.zeros((2 * w - 1) ** 2, heads))
            attn.register_buffer("relative_position_index", _window_index(w), persistent=False)
        self.vit.cls_token = None
        self.vit.patch_embed.strict_img_size = False  # any input size: the windows, not img_size, fix the tables


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


def _window_index(w: int) -> Tensor:
    """The (w*w, w*w) index into a ``(2w-1)^2``-row table (the official detection BEiT's, no cls rows)."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


def _window_attention(attn: nn.Module, x: Tensor, hw: tuple[int, int], w: int) -> Tensor:
    """The official detection ``Attention`` (windowed): (B, h*w, C) normed tokens -> (B, h*w, C)."""
    b, _, c = x.shape
    h, wd = hw
    hp, wp = -(-h // w) * w, -(-wd // w) * w
    x = F.pad(x.view(b, h, wd, c), (0, 0, 0, wp - wd, 0, hp - h))
    x = x.view(b, hp // w, w, wp // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)
    bias = None
    if attn.q_bias is not None:
        bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
    heads = attn.num_heads
    qkv = F.linear(x, attn.qkv.weight, bias).reshape(x.shape[0], w * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * attn.scale, qkv[1], qkv[2]
    table = attn.relative_position_bias_table[attn.relative_position_index.view(-1)]
    logits = q @ k.transpose(-2, -1) + table.view(w * w, w * w, -1).permute(2, 0, 1).unsqueeze(0).to(q.dtype)
    y = attn.attn_drop(logits.softmax(dim=-1)) @ v
    y = attn.proj_drop(attn.proj(y.transpose(1, 2).reshape(x.shape[0], w * w, -1)))
    y = y.view(b, hp // w, wp // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    return y[:, :h, :wd].reshape(b, h * wd, c)


def _window_block(block: nn.Module, hw: tuple[int, int], w: int, x: Tensor) -> Tensor:
    """A timm BEiT block run as the official detection ``Block`` (windowed attention, layer scale)."""
    y = _window_attention(block.attn, block.norm1(x), hw, w)
    if block.gamma_1 is None:
        x = x + block.drop_path1(y)
        return x + block.drop_path2(block.mlp(block.norm2(x)))
    x = x + block.drop_path1(block.gamma_1 * y)
    return x + block.drop_path2(block.gamma_2 * block.mlp(block.norm2(x)))
