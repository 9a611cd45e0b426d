"""HTC++ as ViT-Adapter configures it (mmdet 2.22 ``HybridTaskCascade`` + the ViT-Adapter ``ExtraAttention`` neck),
on torchvision's operators (cascade_htc_README.md §1, §3-4).

What differs from the Cascade Mask R-CNN of :mod:`adapterctl.models.cascade`, and where it lives here:
- one self-attention block (+ FFN, final LayerNorm) on the stride-32 map before the FPN    -> ``ExtraAttention``
- a semantic branch fusing all five FPN levels at stride 8; its ReLU'd embedding is added to every RoI's
  features (2x2-mean-pooled to 7x7 for the boxes, 14x14 for the masks); loss x0.2 over every pixel of the
  1/8 label map (255 ignored but counted)                                                  -> ``FusedSemanticHead``
- 4-conv (bias, no norm) + 1-fc box heads, class-agnostic, SmoothL1 (beta 1) on encoded deltas; stage assigners
  with ``match_low_quality``                                                               -> ``HTCRoIHeads``
- mask information flow: stage k's mask head adds ``relu(conv_res(last))``, ``last`` being stage k-1's features
  after its 4 convs; the test-time mask is the mean of the three stages' probabilities      -> ``HTCMaskHead``
- interleaved training: each stage's mask branch re-assigns and re-samples the stage's refined boxes
- linear soft-NMS (IoU >= 0.5, min score 1e-3) at test time, mmcv's kernel vectorised     -> :func:`soft_nms`
Module names follow mmdet's below ``roi_heads`` and ``backbone.extra_attention`` (``neck.0`` in the checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from adapterctl.models.cascade import (
    STAGE_STDS,
    CascadeRoIHeads,
    ConvFCBBoxHead,
    FCNMaskHead,
    _box_losses,
    _mask_loss,
    _refine,
    _sample,
    candidates,
    class_offset,
)
from adapterctl.models.detector import exporting

SEMANTIC_IGNORE = 255


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.num_heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ExtraAttention(nn.Module):
    """ViT-Adapter's ``ExtraAttention`` neck: pre-norm self-attention and FFN (drop path) on the last map's tokens,
    then a final LayerNorm; the other maps pass through unchanged."""

    def __init__(self, dim: int, num_heads: int, ffn_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        from timm.layers import DropPath

        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = _Mlp(dim, int(dim * ffn_ratio))
        self.final_norm = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        for m in self.modules():  # the official init: truncated normal (std .02) linears, zero bias
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        feat = maps[-1]
        b, c, h, w = feat.shape
        x = feat.flatten(2).transpose(1, 2)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.ffn(self.norm2(x)))
        x = self.final_norm(x)
        return [*maps[:-1], x.transpose(1, 2).reshape(b, c, h, w).contiguous()]


def _conv(cin: int, cout: int, k: int) -> nn.ModuleDict:  # an mmcv ConvModule's parameter names (``.conv.``)
    return nn.ModuleDict({"conv": nn.Conv2d(cin, cout, k, padding=k // 2)})


class FusedSemanticHead(nn.Module):
    """mmdet ``FusedSemanticHead`` (§3.2): every FPN level resized to the fusion level (bilinear,
    ``align_corners=True``) **before** its 1x1 lateral conv + ReLU, summed, 4 x (3x3 conv + ReLU); logits and a
    ReLU'd embedding (1x1 each)."""

    def __init__(
        self, in_channels: int, conv_channels: int, num_classes: int, *, num_ins: int = 5, fusion_level: int = 1,
        num_convs: int = 4, loss_weight: float = 0.2,
    ) -> None:  # fmt: skip
        super().__init__()
        self.fusion_level, self.loss_weight = fusion_level, loss_weight
        self.lateral_convs = nn.ModuleList(_conv(in_channels, in_channels, 1) for _ in range(num_ins))
        self.convs = nn.ModuleList(_conv(in_channels if i == 0 else conv_channels, conv_channels, 3)
                                   for i in range(num_convs))  # fmt: skip
        self.conv_embedding = _conv(conv_channels, conv_channels, 1)
        self.conv_logits = nn.Conv2d(conv_channels, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, maps: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        size = maps[self.fusion_level].shape[-2:]
        x = F.relu(self.lateral_convs[self.fusion_level]["conv"](maps[self.fusion_level]))
        for i, feat in enumerate(maps):
            if i != self.fusion_level:
                feat = F.interpolate(feat, size=size, mode="bilinear", align_corners=True)
                x = x + F.relu(self.lateral_convs[i]["conv"](feat))
        for conv in self.convs:
            x = F.relu(conv["conv"](x))
        return self.conv_logits(x), F.relu(self.conv_embedding["conv"](x))

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``loss_weight`` x cross-entropy summed over the valid pixels / **all** pixels (mmdet 2.22)."""
        ce = F.cross_entropy(logits.float(), labels, ignore_index=SEMANTIC_IGNORE, reduction="none")
        return self.loss_weight * ce.mean()


def semantic_targets(maps: Sequence[Tensor | None], size: tuple[int, int], stride: int = 8) -> Tensor:
    """Each image's label map padded with 255 to the batch's padded canvas ``size`` (h, w), then mmdet's
    ``SegRescale(1/stride)`` (nearest: every ``stride``-th pixel): (B, h / stride, w / stride) int64."""
    out = []
    for m in maps:
        if m is None:
            raise ValueError("HTC++ training needs each target's 'semantic' label map (COCO stuff maps)")
        canvas = m.new_full(size, SEMANTIC_IGNORE, dtype=torch.long)
        canvas[: m.shape[0], : m.shape[1]] = m.long()
        out.append(canvas[::stride, ::stride])
    return torch.stack(out)


class HTCMaskHead(FCNMaskHead):
    """mmdet ``HTCMaskHead``: the FCN mask head, plus (``with_conv_res``) the previous stage's features through
    ``conv_res`` (1x1 + ReLU) added to its input. Returns ``(logits, features after the 4 convs)``."""

    def __init__(self, in_channels: int, conv_channels: int, num_classes: int, with_conv_res: bool = True) -> None:
        super().__init__(in_channels, conv_channels, num_classes)
        self.conv_res = _conv(conv_channels, conv_channels, 1) if with_conv_res else None
        if self.conv_res is not None:
            nn.init.kaiming_normal_(self.conv_res["conv"].weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(self.conv_res["conv"].bias)

    def forward(self, x: Tensor, last: Tensor | None = None, logits: bool = True) -> tuple[Tensor | None, Tensor]:
        if last is not None and self.conv_res is not None:
            x = x + F.relu(self.conv_res["conv"](last))
        for conv in self.convs:
            x = F.relu(conv["conv"](x))
        out = self.conv_logits(F.relu(self.upsample(x))) if logits else None
        return out, x


def soft_nms(
    boxes: Tensor, scores: Tensor, iou_threshold: float = 0.5, min_score: float = 1e-3, max_num: int = -1
) -> tuple[Tensor, Tensor]:
    """mmcv 1.4.2 ``soft_nms`` (``method='linear'``): greedy selection of the current maximum (first in mmcv's
    working order on ties), every remaining box with IoU >= ``iou_threshold`` re-weighted by ``1 - IoU``
    (float32), those below ``min_score`` removed by mmcv's swap-with-last rule. Each selection is one vectorised
    step; ``max_num`` > 0 stops after that many (later steps never change earlier selections).

    Returns (scores at selection, indices into ``boxes``) in selection order."""
    if exporting():
        return _soft_nms_unrolled(boxes, scores, iou_threshold, min_score, max_num)
    n = boxes.shape[0]
    if n == 0:
        return scores.new_zeros(0), torch.zeros(0, dtype=torch.long, device=boxes.device)
    b = boxes.float().clone()
    s = scores.float().clone()
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    idx = torch.arange(n, device=boxes.device)
    out_scores, out_idx = [], []
    limit = n if max_num <= 0 else min(max_num, n)
    while len(out_idx) < limit and b.shape[0]:
        j = int(torch.argmax(s))  # first maximum in the working order
        out_scores.append(s[j])
        out_idx.append(idx[j])
        # mmcv swaps the selection to the front; the rest keeps its order with the front element in slot j
        order = torch.arange(b.shape[0], device=b.device)
        order[j] = 0
        rest = order[1:]
        sel_box, sel_area = b[j], area[j]
        b, s, area, idx = b[rest], s[rest], area[rest], idx[rest]
        xx1 = torch.maximum(sel_box[0], b[:, 0])
        yy1 = torch.maximum(sel_box[1], b[:, 1])
        xx2 = torch.minimum(sel_box[2], b[:, 2])
        yy2 = torch.minimum(sel_box[3], b[:, 3])
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        ovr = inter / (sel_area + area - inter)
        s = torch.where(ovr >= iou_threshold, s * (1 - ovr), s)
        keep = s >= min_score
        m = int(keep.sum())
        if m < keep.numel():  # removed boxes: holes in the first m slots filled by the last survivors, last first
            holes = torch.where(~keep[:m])[0]
            fill = (torch.where(keep[m:])[0] + m).flip(0)
            perm = torch.arange(m, device=b.device)
            perm[holes] = fill
            b, s, area, idx = b[perm], s[perm], area[perm], idx[perm]
    if not out_idx:
        return scores.new_zeros(0), torch.zeros(0, dtype=torch.long, device=boxes.device)
    return torch.stack(out_scores), torch.stack(out_idx)


def _soft_nms_unrolled(boxes: Tensor, scores: Tensor, iou_threshold: float, min_score: float, max_num: int):
    """:func:`soft_nms` without data-dependent sizes, for exported graphs: ``max_num`` unrolled selections over an
    alive mask (the same arithmetic; exact score ties go to the lowest index rather than mmcv's working order)."""
    if max_num <= 0:
        raise ValueError("exporting soft-NMS needs max_num > 0 (the unrolled selections)")
    b, s = boxes.float(), scores.float().clone()
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    alive = s >= min_score
    index = torch.arange(b.shape[0], device=b.device)
    b_pad, area_pad = torch.cat([b, b.new_zeros(1, 4)]), torch.cat([area, area.new_zeros(1)])  # a sentinel row
    picked, picked_scores, valid = [], [], []
    for _ in range(max_num):
        masked = torch.cat([torch.where(alive, s, torch.full_like(s, -1.0)), s.new_full((1,), -1.0)])
        j = torch.argmax(masked)  # the sentinel when nothing is left
        ok = masked[j] >= 0
        sel, sel_area = b_pad[j], area_pad[j]
        picked.append(j)
        picked_scores.append(masked[j])
        valid.append(ok)
        alive = alive & (index != j)
        xx1, yy1 = torch.maximum(sel[0], b[:, 0]), torch.maximum(sel[1], b[:, 1])
        xx2, yy2 = torch.minimum(sel[2], b[:, 2]), torch.minimum(sel[3], b[:, 3])
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        ovr = inter / (sel_area + area - inter)
        s = torch.where(alive & (ovr >= iou_threshold), s * (1 - ovr), s)
        alive = alive & (s >= min_score)
    keep = torch.stack(valid)
    return torch.stack(picked_scores)[keep], torch.stack(picked)[keep]


def multiclass_soft_nms(
    boxes: Tensor, scores: Tensor, score_thr: float, iou_thr: float, max_num: int, min_score: float = 1e-3
) -> tuple[Tensor, Tensor, Tensor]:
    """mmdet ``multiclass_nms`` with ``soft_nms``: row-major (RoI, class) candidates above ``score_thr``, one
    soft-NMS over class-offset boxes, the re-weighted scores; returns (boxes, scores, labels 0..K-1)."""
    b, s, labels = candidates(boxes, scores, score_thr)
    if not exporting() and b.numel() == 0:
        return b, s, labels
    new_scores, kept = soft_nms(class_offset(b, labels), s, iou_thr, min_score, max_num)
    return b[kept], new_scores, labels[kept]


class HTCRoIHeads(CascadeRoIHeads):
    """The HTC++ RoI heads (module docstring): the cascade with semantic fusion, mask information flow,
    interleaving and soft-NMS. ``forward`` keeps torchvision's ``RoIHeads`` contract; the semantic loss is
    ``loss_semantic_seg`` (targets carry a ``semantic`` label map at the image's size)."""

    def __init__(self, *args, semantic_head: FusedSemanticHead, semantic_stride: int = 8, **kwargs) -> None:
        kwargs.setdefault("low_quality", True)
        kwargs.setdefault("box_loss", "smooth_l1")
        kwargs.setdefault("score_thresh", 0.001)
        super().__init__(*args, **kwargs)
        self.semantic_head, self.semantic_stride = semantic_head, semantic_stride

    def _semantic_roi(self, features, boxes: list[Tensor]) -> Tensor:
        from torchvision.ops.poolers import _convert_to_roi_format

        sem = features["semantic"]
        # float32 boxes and map: a bf16 box (autocast) would round 1600-3000 px coordinates to 8-16 px steps
        rois = _convert_to_roi_format([b.float() for b in boxes])
        out = roi_align(sem.float(), rois, (14, 14), 1.0 / self.semantic_stride, sampling_ratio=0, aligned=True)
        return out.to(sem.dtype)

    def box_features(self, features, boxes, image_shapes) -> Tensor:
        x = super().box_features(features, boxes, image_shapes)
        sem = self._semantic_roi(features, boxes)
        return x + F.adaptive_avg_pool2d(sem, x.shape[-2:]).to(x.dtype)

    def mask_features(self, features, boxes, image_shapes) -> Tensor:
        x = super().mask_features(features, boxes, image_shapes)
        return x + self._semantic_roi(features, boxes).to(x.dtype)

    def nms(self, boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return multiclass_soft_nms(boxes, scores, self.score_thresh, self.nms_thresh, self.detections_per_img)

    def semantic(self, features) -> tuple[Tensor, dict[str, Tensor]]:
        """The semantic logits, and ``features`` with the embedding added under ``'semantic'``."""
        logits, embed = self.semantic_head([features[k] for k in features if k != "semantic"])
        return logits, {**features, "semantic": embed}

    def mask_chain(self, feats: Tensor, upto: int, logits_all: bool = False) -> list[Tensor]:
        """Mask heads 0..``upto`` on the same RoI features with information flow; the logits of every head
        (``logits_all``) or of the last only."""
        last, out = None, []
        for k in range(upto + 1):
            logits, last = self.mask_head[k](feats, last, logits=logits_all or k == upto)
            if logits is not None:
                out.append(logits)
        return out

    def mask_probs(self, features, boxes: Tensor, labels: Tensor, image_shape) -> Tensor:
        if not exporting() and boxes.shape[0] == 0:
            return boxes.new_zeros((0, 28, 28))
        feats = self.mask_features(features, [boxes], [image_shape])
        idx = torch.arange(boxes.shape[0], device=boxes.device)
        probs = [lg.sigmoid()[idx, labels] for lg in self.mask_chain(feats, len(self.mask_head) - 1, True)]
        total = probs[0]
        for p in probs[1:]:
            total = total + p
        return total / len(probs)

    def forward(self, features, proposals, image_shapes, targets=None):
        logits, features = self.semantic(features)
        if self.training:
            return [], self.losses(features, proposals, image_shapes, targets, semantic_logits=logits)
        return super().forward(features, proposals, image_shapes)

    def losses(self, features, proposals, image_shapes, targets, semantic_logits=None, record=None):
        """mmdet ``HybridTaskCascadeRoIHead.forward_train`` (interleaved, mask information flow; §4.2)."""
        from adapterctl.models.assign import RandomChoice

        if semantic_logits is None:
            semantic_logits, features = self.semantic(features)
        choice = self.sampler or RandomChoice()
        h, w = semantic_logits.shape[-2:]
        seg = semantic_targets(
            [t.get("semantic") for t in targets], (h * self.semantic_stride, w * self.semantic_stride)
        )
        losses: dict[str, Tensor] = {"loss_semantic_seg": self.semantic_head.loss(semantic_logits, seg)}
        props = [p.detach() for p in proposals]
        for i, head in enumerate(self.bbox_head):
            wt = self.stage_loss_weights[i]
            sample = _sample(self, i, props, targets, choice)
            cls, reg = head(self.box_features(features, sample.boxes, image_shapes))
            box = _box_losses(self, i, sample, cls, reg)
            props = _refine(self, i, sample, cls, reg, image_shapes)  # interleaved: refine before the masks
            mask_sample = _sample(self, i, props, targets, choice)  # ... and re-assign, re-sample the refined boxes
            feats = self.mask_features(features, mask_sample.positives(), image_shapes)
            loss_mask, mask_t = _mask_loss(self.mask_chain(feats, i)[-1], mask_sample, targets)
            losses.update({f"loss_cls.s{i}": wt * box["loss_cls"], f"loss_bbox.s{i}": wt * box["loss_bbox"],
                           f"loss_mask.s{i}": wt * loss_mask, f"acc.s{i}": box["acc"]})  # fmt: skip
            if record is not None:
                record.setdefault("stages", []).append(
                    {"rois": torch.cat(sample.boxes), "labels": torch.cat(sample.labels), "cls_score": cls,
                     "bbox_pred": reg, "gt_boxes": torch.cat(sample.gt_boxes),
                     "mask_rois": torch.cat(mask_sample.positives()), "mask_targets": mask_t}
                )  # fmt: skip
        if record is not None:
            record["semantic_targets"] = seg
        return losses


def build_htc_roi_heads(
    channels: int, strides: Sequence[int], num_classes: int, *, conv_channels: int = 256, fc_channels: int = 1024,
    semantic_classes: int = 183, semantic_loss_weight: float = 0.2, box_norm: bool = False, **kwargs,
) -> HTCRoIHeads:  # fmt: skip
    """The ViT-Adapter HTC++ RoI heads on FPN maps ``'0'..'3'`` at ``strides`` (4, 8, 16, 32), ``'pool'`` (P6)
    joining the semantic fusion. The mask heads and the semantic branch are as wide as the FPN (their outputs are
    added to its RoI features). ``box_norm``: BatchNorm in the box heads' convs (no conv bias; the O365 config's
    SyncBN); ``box_loss`` (in kwargs): ``smooth_l1`` or ``giou`` (x10 on decoded boxes, that config's)."""
    from adapterctl.models.detector import MMRoIAlign

    names = [str(i) for i in range(len(strides))]
    return HTCRoIHeads(
        MMRoIAlign(names, 7, strides),
        MMRoIAlign(names, 14, strides),
        [ConvFCBBoxHead(channels, conv_channels, fc_channels, num_classes, norm=box_norm, class_agnostic=True)
         for _ in range(3)],
        [HTCMaskHead(channels, channels, num_classes, with_conv_res=i > 0) for i in range(3)],
        num_classes,
        stds=STAGE_STDS,
        semantic_head=FusedSemanticHead(channels, channels, semantic_classes, loss_weight=semantic_loss_weight),
        **kwargs,
    )  # fmt: skip
