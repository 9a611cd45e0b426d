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

The token grid ``hw`` need not be the stride-16 map: a patch-14 ViT (DINOv2) puts its tokens on the 1/14 grid
while the spatial prior module keeps strides 8/16/32; the adapter's deformable attention works in normalised
coordinates, and ViT maps are resized to the adapter's sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol

import torch
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


#: modules that register the other families' trunks (imported on first use: they import this one)
FAMILY_MODULES = ("adapterctl.models.trunks_beit", "adapterctl.models.trunks_eva")


def trunk_for(vit: nn.Module) -> Trunk:
    """The trunk implementation for ``vit``'s class (the most specific registered one)."""
    import importlib

    for module in FAMILY_MODULES:
        importlib.import_module(module)
    for model_class, impl in reversed(_TRUNKS):
        if isinstance(vit, model_class):
            return impl(vit)
    known = ", ".join(f"{c.__module__}.{c.__qualname__}" for c, _ in _TRUNKS)
    raise TypeError(f"no trunk drives a {type(vit).__module__}.{type(vit).__qualname__}; known: {known}")


def _vision_transformer() -> type:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


@register_trunk(_vision_transformer())
def timm_vit_trunk(vit: nn.Module) -> Trunk:
    """timm ``VisionTransformer``: the official computation (:class:`TimmViTTrunk`) for DeiT/AugReg-style ViTs
    with 16x16 patches; :class:`TimmPrefixViTTrunk` (DINOv2 style: prefix tokens carried) for other patch sizes,
    register tokens or a pre-norm (CLIP-style), which the official computation would run differently."""
    patch = tuple(vit.patch_embed.proj.kernel_size)
    official = (
        patch == (16, 16)
        and not getattr(vit, "num_reg_tokens", 0)
        and isinstance(getattr(vit, "norm_pre", nn.Identity()), nn.Identity)
    )
    return TimmViTTrunk(vit) if official else TimmPrefixViTTrunk(vit)


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
        # contiguous tokens: the transposed layout of the patch map would follow every residual add and make
        # each LayerNorm and linear of the ViT copy its input first
        return self.vit.pos_drop((tokens + self._pos_embed(hw)).contiguous()), None, hw

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


class TimmPrefixViTTrunk:
    """timm ``VisionTransformer`` as DINOv2's ViT-Adapter runs it: any patch size (14 natively, no kernel
    resampling), the cls token and register tokens carried between interactions (never seen by the injector or
    extractor), position embedding resampled to each input's token grid as timm's own dynamic-size forward does
    (``resample_abs_pos_embed``), layer scale and ``norm_pre`` as timm runs them. Its blocks see exactly what
    timm's ``forward_features`` would give them.
    """

    def __init__(self, vit: nn.Module) -> None:
        if getattr(vit, "pos_embed", None) is None:
            raise ValueError("this trunk needs a ViT with an absolute position embedding")
        kh = patch_size_of(vit)
        self.vit = vit
        self.embed_dim = int(vit.embed_dim)
        self.depth = len(vit.blocks)
        self.patch_size = kh
        self.num_prefix = int(vit.num_prefix_tokens)

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        x, n, hw = embed_with_prefix(self.vit, images, self.patch_size, self.num_prefix)
        x = self.vit.norm_pre(self.vit.patch_drop(x))
        return x[:, n:], (x[:, :n] if n else None), hw

    def run_blocks(
        self, tokens: Tensor, prefix: Tensor | None, first: int, last: int, hw: tuple[int, int], checkpoint: bool
    ) -> tuple[Tensor, Tensor | None]:
        n = 0 if prefix is None else prefix.shape[1]
        x = tokens if prefix is None else torch.cat([prefix, tokens], 1)
        for block in self.vit.blocks[first : last + 1]:
            x = checkpointed(block, x, enabled=checkpoint)
        return x[:, n:], (x[:, :n] if n else None)

    def apply_window_attention(
        self, window_attn: Sequence[bool] | None, window_size: Sequence[int | None] | int | None
    ) -> None:
        if window_attn is not None and any(window_attn):
            raise ValueError("window attention runs on DeiT/AugReg-style ViTs only (patch 16, no prefix tokens)")

    def load_pretrained(self, path):
        """timm-format files (safetensors, .pth, .npz; DINOv2's own key names are timm's): ``load_vit_weights``
        without resampling the patch kernel."""
        from adapterctl.models.pretrained import load_vit_weights

        return load_vit_weights(self.vit, path)


def patch_size_of(vit: nn.Module) -> int:
    """The side of ``vit``'s square, non-overlapping patches (anything else is refused)."""
    kh, kw = (int(k) for k in vit.patch_embed.proj.kernel_size)
    sh, sw = (int(k) for k in vit.patch_embed.proj.stride)
    if kh != kw or (sh, sw) != (kh, kw):
        raise ValueError(f"square, non-overlapping patches only; got kernel {(kh, kw)} stride {(sh, sw)}")
    return kh


def embed_with_prefix(vit: nn.Module, images: Tensor, patch: int, num_prefix: int) -> tuple[Tensor, int, tuple]:
    """timm's patch embedding + ``_pos_embed`` for any input size: patch tokens on the 1/patch grid, the
    (optional) absolute position embedding resampled as timm's dynamic-size forward does, cls and register tokens
    prepended (their position slots added unless ``no_embed_class``), ``pos_drop``. Returns (prefix + patch
    tokens, the number of prefix tokens, the token grid)."""
    from timm.layers import resample_abs_pos_embed

    hw = (images.shape[-2] // patch, images.shape[-1] // patch)
    tokens = vit.patch_embed.norm(vit.patch_embed.proj(images).flatten(2).transpose(1, 2))
    b = images.shape[0]
    parts = [t.expand(b, -1, -1) for t in (vit.cls_token, getattr(vit, "reg_token", None)) if t is not None]
    prefix = torch.cat(parts, 1) if parts else None
    if vit.pos_embed is not None:
        embed_prefix = not getattr(vit, "no_embed_class", False)
        pos = resample_abs_pos_embed(
            vit.pos_embed, new_size=hw, old_size=vit.patch_embed.grid_size,
            num_prefix_tokens=num_prefix if embed_prefix else 0,
        )  # fmt: skip
        if embed_prefix and prefix is not None:
            prefix = prefix + pos[:, :num_prefix]
            pos = pos[:, num_prefix:]
        tokens = tokens + pos
    x = tokens if prefix is None else torch.cat([prefix, tokens], 1)
    return vit.pos_drop(x), (0 if prefix is None else prefix.shape[1]), hw
