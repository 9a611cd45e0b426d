"""Mask2Former head (Cheng et al., "Masked-attention Mask Transformer", CVPR 2022) as ViT-Adapter's
``mmseg_custom`` computes it (mmdet 2.22 / mmcv 1.4.2 semantics), in plain PyTorch.

- :class:`MSDeformAttnPixelDecoder`: the three coarsest maps through six post-norm deformable-attention encoder
  layers (the project's :class:`~adapterctl.layers.ms_deform_attn.MSDeformAttn`), then one FPN step to stride 4
  and the mask features.
- :class:`Mask2FormerHead`: nine post-norm decoder layers, masked cross-attention -> self-attention -> FFN,
  cycling over the 1/32, 1/16, 1/8 memories; ten supervised predictions (one before any layer).

Module and parameter names are the official ones (``pixel_decoder.encoder.layers.0.attentions.0...``,
``transformer_decoder.layers.0.attentions.0.attn.in_proj_weight``, ``query_feat``, ...), so released
checkpoints load 1:1 under ``decode_head.``. Training losses live in :mod:`.mask2former_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterctl.layers.checkpointing import checkpointed
from adapterctl.layers.ms_deform_attn import MSDeformAttn
from adapterctl.models.heads.common import SemanticHead


def sine_position_encoding(b: int, h: int, w: int, num_feats: int, device, dtype=torch.float32) -> Tensor:
    """mmcv's ``SinePositionalEncoding(normalize=True)`` for an unpadded (B, H, W) map: (B, 2*num_feats, H, W).

    Positions count 1..H / 1..W, are scaled by 2*pi / (last + 1e-6); channels interleave sin/cos and the y half
    comes first.
    """
    y = torch.arange(1, h + 1, device=device, dtype=torch.float32).view(1, h, 1).expand(b, h, w)
    x = torch.arange(1, w + 1, device=device, dtype=torch.float32).view(1, 1, w).expand(b, h, w)
    scale, eps = 2 * math.pi, 1e-6
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, device=device)
    dim_t = 10000.0 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_x = x[..., None] / dim_t
    pos_y = y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).view(b, h, w, -1)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).view(b, h, w, -1)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(dtype)


class ConvGN(nn.Module):
    """mmcv ``ConvModule`` with GroupNorm: ``conv`` -> ``gn`` (-> ReLU)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, *, bias: bool, act: bool, groups: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=bias)
        self.gn = nn.GroupNorm(groups, cout)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.gn(self.conv(x)))


class FFN(nn.Module):
    """mmcv ``FFN`` (two layers, ReLU, identity added): ``layers.0.0`` and ``layers.1`` as the official keys."""

    def __init__(self, dims: int, hidden: int, dropout: float = 0.0, with_cp: bool = False) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(dims, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)),
            nn.Linear(hidden, dims),
            nn.Dropout(dropout),
        )
        self.with_cp = with_cp

    def forward(self, x: Tensor) -> Tensor:
        return x + checkpointed(self.layers, x, enabled=self.with_cp)


class DeformEncoderLayer(nn.Module):
    """Post-norm ``self_attn -> norm -> ffn -> norm`` with multi-scale deformable self-attention; the residual of
    the attention is added inside (mmcv's ``MultiScaleDeformableAttention``), the position only to the query."""

    def __init__(self, dims: int, heads: int, levels: int, points: int, hidden: int, with_cp: bool) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([MSDeformAttn(dims, levels, heads, points)])
        self.ffns = nn.ModuleList([FFN(dims, hidden, with_cp=with_cp)])
        self.norms = nn.ModuleList([nn.LayerNorm(dims), nn.LayerNorm(dims)])

    def forward(self, x: Tensor, pos: Tensor, reference_points: Tensor, shapes: Sequence[tuple[int, int]]) -> Tensor:
        x = self.norms[0](x + self.attentions[0](x + pos, reference_points, x, shapes))
        return self.norms[1](self.ffns[0](x))


class _Layers(nn.Module):
    """A ``layers`` ModuleList holder (``encoder.layers.N`` / ``transformer_decoder.layers.N`` keys)."""

    def __init__(self, layers: list[nn.Module], post_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if post_norm is not None:
            self.post_norm = post_norm


class MSDeformAttnPixelDecoder(nn.Module):
    """mmdet 2.22 ``MSDeformAttnPixelDecoder`` with ``num_outs=3``: returns the stride-4 mask features and the
    encoder memories at strides 32, 16, 8 (low to high resolution)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        feat_channels: int = 256,
        out_channels: int = 256,
        num_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_channels: int = 1024,
        num_outs: int = 3,
        num_groups: int = 32,
        with_cp: bool = True,
    ) -> None:
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        self.num_levels = num_outs
        self.num_feats = feat_channels // 2
        if len(in_channels) != num_outs + 1:
            raise ValueError(f"the pixel decoder takes {num_outs + 1} maps (one FPN step), got {len(in_channels)}")
        # input_convs[i] projects the i-th coarsest map (stride 32, 16, 8)
        self.input_convs = nn.ModuleList(
            ConvGN(in_channels[-1 - i], feat_channels, 1, bias=True, act=False, groups=num_groups)
            for i in range(num_outs)
        )
        self.encoder = _Layers(
            [
                DeformEncoderLayer(feat_channels, num_heads, num_outs, num_points, ffn_channels, with_cp)
                for _ in range(num_layers)
            ]
        )
        self.level_encoding = nn.Embedding(num_outs, feat_channels)
        self.lateral_convs = nn.ModuleList(
            [ConvGN(in_channels[0], feat_channels, 1, bias=False, act=False, groups=num_groups)]
        )
        self.output_convs = nn.ModuleList(
            [ConvGN(feat_channels, feat_channels, 3, bias=False, act=True, groups=num_groups)]
        )
        self.mask_feature = nn.Conv2d(feat_channels, out_channels, 1)

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, list[Tensor], Tensor]:
        """``(mask_features, [m32, m16, m8], encoder_memory (B, sum HW, C))``."""
        b = feats[0].shape[0]
        inputs, positions, refs, shapes = [], [], [], []
        for i in range(self.num_levels):
            feat = feats[len(feats) - 1 - i]
            h, w = feat.shape[-2:]
            x = self.input_convs[i](feat)
            pos = sine_position_encoding(b, h, w, self.num_feats, feat.device, x.dtype)
            pos = pos + self.level_encoding.weight[i].view(1, -1, 1, 1)
            ys, xs = torch.meshgrid(
                torch.arange(h, device=feat.device, dtype=torch.float32),
                torch.arange(w, device=feat.device, dtype=torch.float32),
                indexing="ij",
            )
            refs.append(torch.stack(((xs.reshape(-1) + 0.5) / w, (ys.reshape(-1) + 0.5) / h), -1))
            inputs.append(x.flatten(2).transpose(1, 2))
            positions.append(pos.flatten(2).transpose(1, 2))
            shapes.append((int(h), int(w)))
        x = torch.cat(inputs, 1)
        pos = torch.cat(positions, 1)
        # the same centre on every level (all valid ratios are 1): (B, sum HW, L, 2)
        ref = torch.cat(refs, 0).to(x.dtype)[None, :, None, :].expand(b, -1, self.num_levels, -1)
        for layer in self.encoder.layers:
            x = layer(x, pos, ref, shapes)
        memory = x
        outs = [
            part.transpose(1, 2).reshape(b, -1, h, w)
            for part, (h, w) in zip(x.split([h * w for h, w in shapes], 1), shapes, strict=True)
        ]
        lateral = self.lateral_convs[0](feats[0])
        y = lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        y = self.output_convs[0](y)
        return self.mask_feature(y), outs, memory


class AttentionWrapper(nn.Module):
    """mmcv ``MultiheadAttention``: ``attn`` (``nn.MultiheadAttention``, sequence-first), positions added to
    query and key, never to the value; the residual added here."""

    def __init__(self, dims: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dims, heads, dropout=0.0)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, query_pos: Tensor, key_pos: Tensor,
                attn_mask: Tensor | None = None) -> Tensor:  # fmt: skip
        out = self.attn(query + query_pos, key + key_pos, value, attn_mask=attn_mask, need_weights=False)[0]
        return query + out


class DecoderLayer(nn.Module):
    """Post-norm ``cross_attn -> norm -> self_attn -> norm -> ffn -> norm`` (``attentions.0`` is the cross)."""

    def __init__(self, dims: int, heads: int, hidden: int, with_cp: bool) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([AttentionWrapper(dims, heads), AttentionWrapper(dims, heads)])
        self.ffns = nn.ModuleList([FFN(dims, hidden, with_cp=with_cp)])
        self.norms = nn.ModuleList([nn.LayerNorm(dims) for _ in range(3)])

    def forward(self, q: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor, attn_mask: Tensor) -> Tensor:
        q = self.norms[0](self.attentions[0](q, memory, memory, query_pos, memory_pos, attn_mask))
        q = self.norms[1](self.attentions[1](q, q, q, query_pos, query_pos))
        return self.norms[2](self.ffns[0](q))


class Mask2FormerHead(SemanticHead):
    """The Mask2Former decode head of ViT-Adapter's segmentation configs.

    ``forward(features)`` returns a dict: ``cls`` (L, B, Q, K+1) and ``masks`` (L, B, Q, H/4, W/4) logits of all
    ``num_layers + 1`` predictions (index 0 from ``query_feat`` alone), plus the intermediates the official code
    computes (``mask_features``, ``memories``, ``attn_masks`` after the all-blocked-row fix). ``loss(outputs,
    labels)`` makes ToMask targets from (B, H, W) labels and returns the 3 x L loss terms;
    ``semantic_scores`` combines class and mask probabilities of the last prediction at stride 4.

    Args:
        in_channels: channels of the four backbone maps (strides 4, 8, 16, 32).
        num_classes: K (``num_things_classes + num_stuff_classes``); the no-object class is K.
        feat_channels / out_channels: the width (equal) of pixel decoder and decoder (1024 in the BEiT-L configs).
        num_queries: 100 (640 configs) or 200 (896 configs).
        num_heads, ffn_channels: both transformers' (32 and 4096 in the BEiT-L configs); ``enc_ffn_channels``
            the pixel decoder's FFN where it differs (the BEiT-B rows: 1024, decoder 2048).
        enc_layers, dec_layers, enc_points: 6, 9, 4.
        num_groups: GroupNorm groups of the pixel decoder.
        with_cp: activation checkpointing of the FFNs (memory only).
        num_points, oversample_ratio, importance_sample_ratio: the point-sampled losses (12544, 3.0, 0.75).
        cls_weight, mask_weight, dice_weight, no_object_weight: the loss and matching weights (2, 5, 5, 0.1).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int = 150,
        feat_channels: int = 256,
        out_channels: int | None = None,
        num_queries: int = 100,
        num_heads: int = 8,
        ffn_channels: int = 2048,
        enc_ffn_channels: int | None = None,
        enc_layers: int = 6,
        dec_layers: int = 9,
        enc_points: int = 4,
        num_groups: int = 32,
        with_cp: bool = True,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        cls_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        ignore_index: int = 255,
        in_index: Sequence[int] = (0, 1, 2, 3),
        align_corners: bool = False,
        loss_name: str = "loss",
    ) -> None:
        super().__init__(loss_name=loss_name, ignore_index=ignore_index, align_corners=align_corners)
        out_channels = int(out_channels or feat_channels)
        if out_channels != feat_channels:  # the mask embedding meets the pixel decoder's mask features
            raise ValueError(f"out_channels ({out_channels}) must equal feat_channels ({feat_channels})")
        if len(in_index) != 4:
            raise ValueError(f"in_index must name four maps (strides 4, 8, 16, 32), got {list(in_index)}")
        self.in_index = [int(i) for i in in_index]
        self.num_classes = int(num_classes)
        self.num_queries = int(num_queries)
        self.num_heads = int(num_heads)
        self.num_levels = 3
        self.num_points = int(num_points)
        self.oversample_ratio = float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)
        self.cls_weight, self.mask_weight, self.dice_weight = float(cls_weight), float(mask_weight), float(dice_weight)
        self.no_object_weight = float(no_object_weight)
        c = int(feat_channels)
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            [in_channels[i] for i in self.in_index], c, out_channels, enc_layers, num_heads, enc_points,
            int(enc_ffn_channels or ffn_channels), self.num_levels, num_groups, with_cp,
        )  # fmt: skip
        self.transformer_decoder = _Layers(
            [DecoderLayer(c, num_heads, ffn_channels, with_cp) for _ in range(dec_layers)], nn.LayerNorm(c)
        )
        self.query_embed = nn.Embedding(num_queries, c)
        self.query_feat = nn.Embedding(num_queries, c)
        self.level_embed = nn.Embedding(self.num_levels, c)
        self.cls_embed = nn.Linear(c, self.num_classes + 1)
        self.mask_embed = nn.Sequential(
            nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, out_channels)
        )
        self.register_buffer("class_weight", torch.ones(self.num_classes + 1), persistent=False)
        self.class_weight[-1] = self.no_object_weight
        self.init_weights()

    def init_weights(self) -> None:
        """The official initialisation (from scratch): xavier-normal for every decoder and encoder matrix,
        Deformable-DETR init of the MSDA, xavier-uniform input convs, caffe2-xavier FPN convs."""
        for p in self.transformer_decoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        pd = self.pixel_decoder
        for layer in pd.encoder.layers:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_normal_(p)
            layer.attentions[0].reset_parameters()
        for conv in pd.input_convs:
            nn.init.xavier_uniform_(conv.conv.weight)
            nn.init.zeros_(conv.conv.bias)
        for m in (pd.lateral_convs[0].conv, pd.output_convs[0].conv, pd.mask_feature):
            nn.init.kaiming_uniform_(m.weight, a=1)  # caffe2_xavier_init
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.normal_(pd.level_encoding.weight)

    # ------------------------------------------------------------------ forward
    def _predict(self, q: Tensor, mask_features: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        h = self.transformer_decoder.post_norm(q).transpose(0, 1)  # B, Q, C
        cls = self.cls_embed(h)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(h), mask_features)
        attn = F.interpolate(masks, size, mode="bilinear", align_corners=False)
        blocked = (attn.flatten(2).sigmoid() < 0.5).detach()  # B, Q, HW; True = blocked
        return cls, masks, blocked

    def forward(self, features: Sequence[Tensor]) -> dict[str, Any]:
        mask_features, memories, encoder_memory = self.pixel_decoder([features[i] for i in self.in_index])
        out = self.decode(mask_features, memories)
        out["encoder_memory"] = encoder_memory
        return out

    def decode(self, mask_features: Tensor, memories: list[Tensor]) -> dict[str, Any]:
        """The transformer decoder on the pixel decoder's outputs: all predictions and attention masks."""
        b = mask_features.shape[0]
        mems, mem_pos = [], []
        for i, m in enumerate(memories):
            mems.append(m.flatten(2).permute(2, 0, 1) + self.level_embed.weight[i].view(1, 1, -1))
            pos = sine_position_encoding(b, m.shape[-2], m.shape[-1], m.shape[1] // 2, m.device, m.dtype)
            mem_pos.append(pos.flatten(2).permute(2, 0, 1))
        query_pos = self.query_embed.weight.unsqueeze(1).expand(-1, b, -1)
        q = self.query_feat.weight.unsqueeze(1).expand(-1, b, -1)
        cls, masks, blocked = self._predict(q, mask_features, memories[0].shape[-2:])
        all_cls, all_masks, attn_masks = [cls], [masks], []
        for i, layer in enumerate(self.transformer_decoder.layers):
            lv = i % self.num_levels
            blocked = blocked & ~blocked.all(-1, keepdim=True)  # a row blocked everywhere attends everywhere
            attn_masks.append(blocked)
            mask = blocked.repeat_interleave(self.num_heads, dim=0)  # (B*heads, Q, HW), batch-major
            q = layer(q, query_pos, mems[lv], mem_pos[lv], mask)
            cls, masks, blocked = self._predict(q, mask_features, memories[(i + 1) % self.num_levels].shape[-2:])
            all_cls.append(cls)
            all_masks.append(masks)
        return {
            "cls": torch.stack(all_cls),
            "masks": torch.stack(all_masks),
            "mask_features": mask_features,
            "memories": memories,
            "attn_masks": attn_masks,
        }

    # ------------------------------------------------------------------ contract of SemanticHead
    def semantic_scores(self, outputs: dict[str, Any]) -> Tensor:
        """``softmax(cls)[..., :K] x sigmoid(mask)`` of the last prediction, at stride 4 (then resized by the
        segmentor: ViT-Adapter's order; upsampling the mask logits first is detectron2's and differs)."""
        cls = outputs["cls"][-1].float().softmax(-1)[..., :-1]
        return torch.einsum("bqc,bqhw->bchw", cls, outputs["masks"][-1].float().sigmoid())

    def loss(self, outputs: dict[str, Any], labels: Tensor, points: Any = None) -> dict[str, Tensor]:
        """The 3 x L loss terms for (B, H, W) labels (ToMask: one mask per present class, ignored pixels in none).

        ``points``: a :class:`~adapterctl.models.heads.mask2former_loss.PointSampler` (default: ``torch.rand`` on
        the predictions' device in the official call order, so ``torch.manual_seed`` reproduces the official
        draws), e.g. one with its own ``torch.Generator`` or one replaying stored points.
        """
        from adapterctl.models.heads.mask2former_loss import mask2former_losses, to_mask

        gt_labels, gt_masks = to_mask(labels, self.ignore_index)
        return mask2former_losses(self, outputs, gt_labels, gt_masks, points)
