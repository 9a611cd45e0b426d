"""Trunks: how the ViT-Adapter drives a plain ViT, whatever its family.

The adapter sees a trunk only through this protocol, never through a block's private attributes:

- ``embed(images) -> (tokens, prefix, hw)``: patch tokens (B, h*w, D) on the ``hw`` grid, with their position
  information; ``prefix`` holds the tokens that ride along without entering the injector or extractor (a cls
  token, registers) or is None.
- ``run_blocks(tokens, prefix, first, last, hw, checkpoint) -> (tokens, prefix)``: blocks ``first..last``
  (inclusive), each given what it needs (the grid for windowed attention; a relative-position bias or RoPE in
  other families).
- ``apply_window_attention(window_attn, window_size)``: per-block windows, refusing what it cannot window.
- ``load_pretrained(path) -> LoadReport``: the family's own weight files (and their layouts) from a local path.
- ``embed_dim``, ``depth``, ``patch_size``.

A new family (timm ``Beit``, ``Eva``) is one more implementation and a :func:`register_trunk` line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol

import torch.nn.functional as F
from torch import Tensor, nn

from adapterctl.layers.attention import WindowedAttention
from adapterctl.layers.checkpointing import checkpointed


class Trunk(Protocol):
    embed_dim: int
    depth: int
    patch_size: int

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor | None, tuple[int, int]]: ...

    def run_blocks(
        self, tokens: Tensor, prefix: Tensor | None, first: int, last: int, hw: tuple[int, int], checkpoint: bool
    ) -> tuple[Tensor, Tensor | None]: ...

    def apply_window_attention(
        self, window_attn: Sequence[bool] | None, window_size: Sequence[int | None] | int | None
    ) -> None: ...

    def load_pretrained(self, path) -> object: ...


_TRUNKS: list[tuple[type, Callable[[nn.Module], Trunk]]] = []


def register_trunk(model_class: type) -> Callable:
    """Class decorator: ``model_class`` instances (and subclasses) are driven by the decorated implementation."""

    def wrap(impl: Callable[[nn.Module], Trunk]) -> Callable[[nn.Module], Trunk]:
        _TRUNKS.append((model_class, impl))
        return impl

    return wrap


def trunk_for(vit: nn.Module) -> Trunk:
    """The trunk implementation for ``vit``'s class (the most specific registered one)."""
    for model_class, impl in reversed(_TRUNKS):
        if isinstance(vit, model_class):
            return impl(vit)
    known = ", ".join(f"{c.__module__}.{c.__qualname__}" for c, _ in _TRUNKS)
    raise TypeError(f"no trunk drives a {type(vit).__module__}.{type(vit).__qualname__}; known: {known}")


def _vision_transformer() -> type:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


@register_trunk(_vision_transformer())
class TimmViTTrunk:
    """timm ``VisionTransformer`` as the official ViT-Adapter runs its DeiT / AugReg ViTs: 16x16 patches, no cls
    token in the forward (its position-embedding slot stays, checkpoints carry it), the pretraining
    position-embedding grid resized bicubically to each input's token grid, blocks run as timm defines them.

    Not an ``nn.Module``: it holds no parameters of its own, so the ViT's keep their timm names (``vit.*``).
    """

    def __init__(self, vit: nn.Module) -> None:
        patch = tuple(vit.patch_embed.proj.kernel_size)
        if patch != (16, 16):
            raise ValueError(
                f"ViTAdapter needs a ViT with 16x16 patches (its token grid is the stride-16 map); got {patch}. "
                "For a patch-14 model (DINOv2) resample the patch embedding to 16 first, e.g. "
                "timm.create_model(name, patch_size=16, img_size=...) with weights loaded through "
                "adapterctl.models.pretrained.load_vit_weights, which resamples the kernel."
            )
        unlike = [
            what
            for what, found in (
                ("register tokens", getattr(vit, "num_reg_tokens", 0)),
                ("a pre-norm (norm_pre)", not isinstance(getattr(vit, "norm_pre", nn.Identity()), nn.Identity)),
                ("no position embedding", getattr(vit, "pos_embed", None) is None),
            )
            if found
        ]
        if unlike:  # each would run differently from the official computation and from its own pretraining
            raise ValueError(f"this trunk drives DeiT/AugReg-style ViTs; the given one has {', '.join(unlike)}")
        self.vit = vit
        self.embed_dim = int(vit.embed_dim)
        self.depth = len(vit.blocks)
        self.patch_size = 16
        vit.cls_token = None  # the official forward has no cls token

    def embed(self, images: Tensor) -> tuple[Tensor, None, tuple[int, int]]:
        hw = (images.shape[-2] // 16, images.shape[-1] // 16)
        tokens = self.vit.patch_embed.proj(images).flatten(2).transpose(1, 2)  # B, HW, D
        tokens = self.vit.patch_embed.norm(tokens)
        return self.vit.pos_drop(tokens + self._pos_embed(hw)), None, hw

    def _pos_embed(self, hw: tuple[int, int]) -> Tensor:
        """The pretraining pos-embed grid (cls slot dropped) resized bicubically to the token grid."""
        pos = self.vit.pos_embed
        n_prefix = 0 if getattr(self.vit, "no_embed_class", False) else self.vit.num_prefix_tokens
        pos = pos[:, n_prefix:]
        side = math.isqrt(pos.shape[1])
        pos = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=hw, mode="bicubic", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def run_blocks(
        self, tokens: Tensor, prefix: None, first: int, last: int, hw: tuple[int, int], checkpoint: bool
    ) -> tuple[Tensor, None]:
        for block in self.vit.blocks[first : last + 1]:
            tokens = checkpointed(partial(_run_block, block, hw=hw), tokens, enabled=checkpoint)
        return tokens, prefix

    def apply_window_attention(
        self, window_attn: Sequence[bool] | None, window_size: Sequence[int | None] | int | None
    ) -> None:
        if window_attn is None:
            return
        depth = self.depth
        if len(window_attn) != depth:
            raise ValueError(f"window_attn has {len(window_attn)} entries for a ViT of depth {depth}")
        sizes = [window_size] * depth if window_size is None or isinstance(window_size, int) else list(window_size)
        if len(sizes) != depth:
            raise ValueError(f"window_size has {len(sizes)} entries for a ViT of depth {depth}")
        for block, on, ws in zip(self.vit.blocks, window_attn, sizes, strict=True):
            if on:
                if not ws:
                    raise ValueError("window_attn is on for a block but its window_size is not set")
                block.attn = WindowedAttention(block.attn, int(ws))

    def load_pretrained(self, path):
        """timm-format ViT files (DeiT, AugReg .pth / .npz, safetensors): ``load_vit_weights``."""
        from adapterctl.models.pretrained import load_vit_weights

        return load_vit_weights(self.vit, path)


def _run_block(block: nn.Module, x: Tensor, hw: tuple[int, int]) -> Tensor:
    """One timm ViT block; a windowed-attention block gets the token grid it needs."""
    if isinstance(block.attn, WindowedAttention):
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), hw)))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return block(x)
