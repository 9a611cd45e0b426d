"""Windowed self-attention for plain ViT blocks, as ViT-Adapter runs it in its detection configs.

Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection" (ViTDet) style windows without
shift. The official implementation pads the qkv map with zeros to a multiple of the window and attends over
every position of each window **without a mask**: padded keys take part with logit 0 and value 0. We keep that,
since released checkpoints were trained with it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class WindowedAttention(nn.Module):
    """Non-overlapping window attention that reuses a timm ``Attention``'s ``qkv`` and ``proj`` layers.

    The wrapped projections keep their names (``attn.qkv``, ``attn.proj``) so timm and official weights load
    unchanged.
    """

    def __init__(self, attn: nn.Module, window_size: int) -> None:
        super().__init__()
        _check_plain(attn)
        self.qkv = attn.qkv
        self.proj = attn.proj
        self.attn_drop = getattr(attn, "attn_drop", nn.Identity())
        self.proj_drop = getattr(attn, "proj_drop", nn.Identity())
        self.num_heads = attn.num_heads
        self.window_size = window_size

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        h, w = hw
        b, n, c = x.shape
        ws = self.window_size
        heads = self.num_heads
        pad_h, pad_w = (-h) % ws, (-w) % ws
        qkv = self.qkv(x)  # B, N, 3C
        qkv = qkv.view(b, h, w, 3 * c)
        if pad_h or pad_w:
            qkv = F.pad(qkv, (0, 0, 0, pad_w, 0, pad_h))  # zeros, not the bias
        hp, wp = h + pad_h, w + pad_w
        nh, nw = hp // ws, wp // ws
        # B, nh, ws, nw, ws, 3, heads, hd -> 3, B*nh*nw, heads, ws*ws, hd
        qkv = qkv.view(b, nh, ws, nw, ws, 3, heads, c // heads)
        qkv = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, b * nh * nw, heads, ws * ws, c // heads)
        q, k, v = qkv.unbind(0)
        dropout = self.attn_drop.p if (self.training and isinstance(self.attn_drop, nn.Dropout)) else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        # B*nh*nw, heads, ws*ws, hd -> B, hp, wp, C
        out = out.view(b, nh, nw, heads, ws, ws, c // heads).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, hp, wp, c)
        out = out[:, :h, :w].reshape(b, n, c)
        return self.proj_drop(self.proj(out))


def _check_plain(attn: nn.Module) -> None:
    """Refuse an attention this window form would compute differently: anything but timm's plain ``Attention``,
    or one with q/k norms, an output norm, a gate, a head width other than ``dim / heads``, or extra parameters
    (timm ``Beit`` attention's ``q_bias``/``v_bias`` and relative-position table would be silently dropped)."""
    from timm.models.vision_transformer import Attention

    what = f"{type(attn).__module__}.{type(attn).__qualname__}"
    if not isinstance(attn, Attention):
        raise TypeError(f"window attention wraps timm's vision_transformer.Attention only; got {what}")
    extra = [n for n in ("q_norm", "k_norm", "norm") if not isinstance(getattr(attn, n, nn.Identity()), nn.Identity)]
    extra += [
        n for n in ("gate", "q_bias", "v_bias", "relative_position_bias_table") if getattr(attn, n, None) is not None
    ]
    if extra:
        raise TypeError(f"window attention cannot reproduce this {what}: it has {', '.join(extra)}")
    if attn.qkv.out_features != 3 * attn.qkv.in_features:
        raise TypeError(f"window attention needs head width dim / num_heads; {what} has qkv {attn.qkv}")
