"""Cascade Mask R-CNN as ViT-Adapter configures it (mmdet 2.22 ``CascadeRoIHead``), on torchvision's operators.

What the official Cascade config computes (cascade_htc_README.md §3-4), and where it lives here:
- three stages (IoU 0.5 / 0.6 / 0.7, target stds 0.1/0.2, 0.05/0.1, 0.033/0.067, loss weights 1 / 0.5 / 0.25) of
  4-conv (BatchNorm, no conv bias) + 1-fc box heads with **class-specific** regression     -> ``ConvFCBBoxHead``
- at test time each stage refines the RoIs with its own foreground argmax (clipped); the scores are the softmax of
  the **mean of the three stages' logits**; the boxes are the last stage's, per class      -> ``CascadeRoIHeads``
- ``multiclass_nms``: (RoI, class) candidates in row-major order above ``score_thr`` (strict), one NMS over
  class-offset boxes, the first ``max_per_img``                                            -> :func:`multiclass_nms`
- three independent FCN mask heads; the final mask averages their **probabilities**      -> ``FCNMaskHead``
Module names are mmdet's below ``roi_heads`` (``bbox_head.0.shared_convs.0.conv``, ``mask_head.2.conv_logits``),
and classes keep mmdet's order inside the heads (background last); outputs use torchvision's labels 1..K.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from adapterctl.models.assign import RandomChoice, max_iou_assign, sample_pos_neg
from adapterctl.models.detector import exporting

STAGE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
_MAX_RATIO = abs(math.log(16 / 1000))


def delta2bbox(rois: Tensor, deltas: Tensor, stds: Sequence[float], max_shape: tuple[int, int] | None = None) -> Tensor:
    """mmdet ``DeltaXYWHBBoxCoder.decode`` (means 0): ``deltas`` (N, 4k) against (N, 4) RoIs -> (N, 4k) boxes,
    dw/dh clamped to +-log(1000/16), clipped to ``max_shape`` (h, w) when given."""
    n = deltas.shape[0]
    d = deltas.reshape(n, -1, 4) * deltas.new_tensor(stds)
    dx, dy = d[..., 0], d[..., 1]
    dw, dh = d[..., 2].clamp(-_MAX_RATIO, _MAX_RATIO), d[..., 3].clamp(-_MAX_RATIO, _MAX_RATIO)
    px = ((rois[:, 0] + rois[:, 2]) * 0.5)[:, None]
    py = ((rois[:, 1] + rois[:, 3]) * 0.5)[:, None]
    pw = (rois[:, 2] - rois[:, 0])[:, None]
    ph = (rois[:, 3] - rois[:, 1])[:, None]
    gw, gh = pw * dw.exp(), ph * dh.exp()
    gx, gy = px + pw * dx, py + ph * dy
    boxes = torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], -1)
    if max_shape is not None:
        h, w = max_shape
        boxes[..., 0::2] = boxes[..., 0::2].clamp(0, w)
        boxes[..., 1::2] = boxes[..., 1::2].clamp(0, h)
    return boxes.reshape(n, -1)


def bbox2delta(proposals: Tensor, gt: Tensor, stds: Sequence[float]) -> Tensor:
    """mmdet ``DeltaXYWHBBoxCoder.encode`` (means 0)."""
    px, py = (proposals[:, 0] + proposals[:, 2]) * 0.5, (proposals[:, 1] + proposals[:, 3]) * 0.5
    pw, ph = proposals[:, 2] - proposals[:, 0], proposals[:, 3] - proposals[:, 1]
    gx, gy = (gt[:, 0] + gt[:, 2]) * 0.5, (gt[:, 1] + gt[:, 3]) * 0.5
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], -1)
    return deltas / deltas.new_tensor(stds)


def _max_coordinate(b: Tensor) -> Tensor:
    """``b.max()``; while exporting (the count is data-dependent) over the boxes and a 0, defined when empty (the
    same value: the candidates are clipped to the image)."""
    return torch.cat([b.flatten(), b.new_zeros(1)]).max() if exporting() else b.max()


def multiclass_nms(
    boxes: Tensor, scores: Tensor, score_thr: float, iou_thr: float, max_num: int
) -> tuple[Tensor, Tensor, Tensor]:
    """mmdet ``multiclass_nms`` with hard NMS: ``boxes`` (N, 4K) or (N, 4), ``scores`` (N, K+1) background last.
    Returns (boxes, scores, labels 0..K-1) in NMS order."""
    b, s, labels = candidates(boxes, scores, score_thr)
    if not exporting() and b.numel() == 0:
        return b, s, labels
    kept = nms(class_offset(b, labels), s, iou_thr)[:max_num]
    return b[kept], s[kept], labels[kept]


def candidates(boxes: Tensor, scores: Tensor, score_thr: float) -> tuple[Tensor, Tensor, Tensor]:
    """The (RoI, class) pairs of ``boxes`` (N, 4K) or (N, 4) and ``scores`` (N, K+1, background last) scoring
    above ``score_thr`` (strict), in row-major order (RoI-major, class-minor): (boxes, scores, labels 0..K-1)."""
    n, k = scores.shape[0], scores.shape[1] - 1
    b = boxes.reshape(n, -1, 4)
    b = b.expand(n, k, 4) if b.shape[1] == 1 else b
    s = scores[:, :k]
    labels = torch.arange(k, device=scores.device).view(1, -1).expand_as(s)
    b, s, labels = b.reshape(-1, 4), s.reshape(-1), labels.reshape(-1)
    keep = torch.where(s > score_thr)[0]
    return b[keep], s[keep], labels[keep]


def class_offset(boxes: Tensor, labels: Tensor) -> Tensor:
    """mmcv ``batched_nms``'s boxes: each class shifted by ``label * (max coordinate + 1)``."""
    return boxes + (labels.to(boxes) * (_max_coordinate(boxes) + torch.tensor(1).to(boxes)))[:, None]


class _ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, norm: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=not norm)
        self.bn = nn.BatchNorm2d(cout) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class ConvFCBBoxHead(nn.Module):
    """mmdet ``ConvFCBBoxHead`` with 4 shared 3x3 convs and 1 shared fc: classes background-last, regression
    class-specific (4K) or class-agnostic (4)."""

    def __init__(
        self, in_channels: int, conv_channels: int, fc_channels: int, num_classes: int, roi_size: int = 7,
        norm: bool = True, class_agnostic: bool = False, num_convs: int = 4,
    ) -> None:  # fmt: skip
        super().__init__()
        self.shared_convs = nn.ModuleList(
            _ConvBN(in_channels if i == 0 else conv_channels, conv_channels, norm) for i in range(num_convs)
        )
        self.shared_fcs = nn.ModuleList([nn.Linear(conv_channels * roi_size * roi_size, fc_channels)])
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4 if class_agnostic else 4 * num_classes)
        self.num_classes, self.class_agnostic = num_classes, class_agnostic
        for m in self.modules():  # mmdet init: kaiming convs (ConvModule), xavier fcs, N(0,.01) cls, N(0,.001) reg
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.xavier_uniform_(self.shared_fcs[0].weight)
        nn.init.zeros_(self.shared_fcs[0].bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        for conv in self.shared_convs:
            x = conv(x)
        x = F.relu(self.shared_fcs[0](x.flatten(1)))
        return self.fc_cls(x), self.fc_reg(x)

    def deltas_for(self, reg: Tensor, labels: Tensor) -> Tensor:
        """The (N, 4) deltas of each RoI's class (class-agnostic: the only ones)."""
        if self.class_agnostic:
            return reg
        idx = (labels * 4)[:, None] + torch.arange(4, device=reg.device)
        return reg.gather(1, idx)


class FCNMaskHead(nn.Module):
    """mmdet ``FCNMaskHead``: 4 x (3x3 conv + ReLU), 2x deconv + ReLU, 1x1 logits per class."""

    def __init__(self, in_channels: int, conv_channels: int, num_classes: int, num_convs: int = 4) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.ModuleDict({"conv": nn.Conv2d(in_channels if i == 0 else conv_channels, conv_channels, 3, padding=1)})
            for i in range(num_convs)
        )
        self.upsample = nn.ConvTranspose2d(conv_channels, conv_channels, 2, 2)
        self.conv_logits = nn.Conv2d(conv_channels, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = F.relu(conv["conv"](x))
        return self.conv_logits(F.relu(self.upsample(x)))


class CascadeRoIHeads(nn.Module):
    """The three-stage cascade of box and mask heads (inference; training in :meth:`losses`).

    ``forward(features, proposals, image_shapes, targets=None)`` has torchvision's ``RoIHeads`` contract:
    inference returns ``[{boxes, labels (1..K), scores, masks (D, 1, 28, 28) probabilities}]``.
    """

    def __init__(
        self, box_roi_pool: nn.Module, mask_roi_pool: nn.Module, bbox_heads: Sequence[nn.Module],
        mask_heads: Sequence[nn.Module], num_classes: int, *, stds: Sequence[Sequence[float]] = STAGE_STDS,
        stage_loss_weights: Sequence[float] = (1.0, 0.5, 0.25), iou_thresholds: Sequence[float] = (0.5, 0.6, 0.7),
        score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
        batch_size_per_image: int = 512, positive_fraction: float = 0.25, low_quality: bool = False,
        box_loss: str = "giou", sampler: RandomChoice | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.box_roi_pool, self.mask_roi_pool = box_roi_pool, mask_roi_pool
        self.bbox_head = nn.ModuleList(bbox_heads)
        self.mask_head = nn.ModuleList(mask_heads)
        self.num_classes = num_classes
        self.stds = [tuple(float(v) for v in s) for s in stds]
        self.stage_loss_weights = [float(w) for w in stage_loss_weights]
        self.iou_thresholds = [float(t) for t in iou_thresholds]
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.low_quality = low_quality  # mmdet match_low_quality of the stage assigners (Cascade: off, HTC++: on)
        if box_loss not in ("giou", "smooth_l1"):
            raise ValueError(f"box_loss must be giou or smooth_l1, got {box_loss!r}")
        self.box_loss = box_loss  # "giou" (Cascade: decoded boxes) or "smooth_l1" (HTC++: encoded deltas)
        self.sampler = sampler

    def box_features(self, features, boxes: list[Tensor], image_shapes) -> Tensor:
        """The box heads' 7x7 RoI features (HTC++ adds its semantic features here)."""
        return self.box_roi_pool(features, boxes, image_shapes)

    def mask_features(self, features, boxes: list[Tensor], image_shapes) -> Tensor:
        """The mask heads' 14x14 RoI features."""
        return self.mask_roi_pool(features, boxes, image_shapes)

    def nms(self, boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The test-time ``multiclass_nms`` (hard NMS; HTC++: soft-NMS)."""
        return multiclass_nms(boxes, scores, self.score_thresh, self.nms_thresh, self.detections_per_img)

    def stage_outputs(self, features, rois: Tensor, image_shape: tuple[int, int]) -> list[dict[str, Tensor]]:
        """Each stage's input RoIs and raw outputs at test time (the refinement chain of §3.3)."""
        out = []
        for i, head in enumerate(self.bbox_head):
            cls, reg = head(self.box_features(features, [rois], [image_shape]))
            out.append({"rois": rois, "cls_score": cls, "bbox_pred": reg})
            if i < len(self.bbox_head) - 1:
                labels = cls[:, : self.num_classes].argmax(1)
                rois = delta2bbox(rois, head.deltas_for(reg, labels), self.stds[i], image_shape)
        return out

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            return [], self.losses(features, proposals, image_shapes, targets)
        results = []
        for i, (rois, shape) in enumerate(zip(proposals, image_shapes, strict=True)):
            feats = {k: v[i : i + 1] for k, v in features.items()}
            stages = self.stage_outputs(feats, rois, shape)
            cls = sum(s["cls_score"] for s in stages) / float(len(stages))
            scores = F.softmax(cls, dim=-1)
            last = stages[-1]
            boxes = delta2bbox(last["rois"], last["bbox_pred"], self.stds[-1], shape)
            det_boxes, det_scores, det_labels = self.nms(boxes, scores)
            results.append({
                "boxes": det_boxes, "scores": det_scores, "labels": det_labels + 1,
                "masks": self.mask_probs(feats, det_boxes, det_labels, shape)[:, None],
            })  # fmt: skip
        return results, {}

    def mask_probs(self, features, boxes: Tensor, labels: Tensor, image_shape) -> Tensor:
        """The mean of the stage heads' sigmoid probabilities of each detection's class: (D, 28, 28)."""
        if not exporting() and boxes.shape[0] == 0:
            return boxes.new_zeros((0, 28, 28))
        feats = self.mask_features(features, [boxes], [image_shape])
        idx = torch.arange(boxes.shape[0], device=boxes.device)
        probs = [head(feats).sigmoid()[idx, labels] for head in self.mask_head]
        total = probs[0]
        for p in probs[1:]:
            total = total + p
        return total / len(probs)


def build_cascade_roi_heads(
    channels: int, strides: Sequence[int], num_classes: int, *, conv_channels: int = 256, fc_channels: int = 1024,
    mask_channels: int = 256, **kwargs,
) -> CascadeRoIHeads:  # fmt: skip
    """The ViT-Adapter Cascade RoI head on FPN maps ``'0'..'3'`` at ``strides`` (4, 8, 16, 32)."""
    from adapterctl.models.detector import MMRoIAlign

    names = [str(i) for i in range(len(strides))]
    return CascadeRoIHeads(
        MMRoIAlign(names, 7, strides),
        MMRoIAlign(names, 14, strides),
        [ConvFCBBoxHead(channels, conv_channels, fc_channels, num_classes) for _ in range(3)],
        [FCNMaskHead(channels, mask_channels, num_classes) for _ in range(3)],
        num_classes,
        **kwargs,
    )


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """1 - GIoU of aligned (N, 4) boxes, mmdet's eps on the union and the enclosing area."""
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    lt, rb = torch.max(pred[:, :2], target[:, :2]), torch.min(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    union = torch.clamp(area_p + area_t - overlap, min=eps)
    elt, erb = torch.min(pred[:, :2], target[:, :2]), torch.max(pred[:, 2:], target[:, 2:])
    ewh = (erb - elt).clamp(min=0)
    enclose = torch.clamp(ewh[:, 0] * ewh[:, 1], min=eps)
    return 1 - (overlap / union - (enclose - union) / enclose)


class _Sample:
    """One stage's sampled RoIs over the batch: per image the boxes ``[positives; negatives]``, their labels
    (mmdet 0..K-1, K = background), the positives' GT boxes and indices, and which rows are GT boxes."""

    def __init__(self) -> None:
        self.boxes: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.gt_boxes: list[Tensor] = []
        self.matched: list[Tensor] = []
        self.is_gt: list[Tensor] = []

    def positives(self) -> list[Tensor]:
        return [b[: m.numel()] for b, m in zip(self.boxes, self.matched, strict=True)]


def _sample(heads: CascadeRoIHeads, stage: int, proposals: list[Tensor], targets, choice: RandomChoice) -> _Sample:
    """mmdet ``MaxIoUAssigner`` + ``RandomSampler(add_gt_as_proposals=True)`` per image (§4.2 steps 1-2)."""
    thr, k = heads.iou_thresholds[stage], heads.num_classes
    out = _Sample()
    for p, t in zip(proposals, targets, strict=True):
        gts, gl = t["boxes"], t["labels"] - 1  # torchvision labels 1..K -> mmdet 0..K-1
        g = gts.shape[0]
        gt_inds, _ = max_iou_assign(p, gts, thr, thr, thr, heads.low_quality)
        gt_inds = torch.cat([torch.arange(1, g + 1, device=p.device), gt_inds])  # the GTs prepended (add_gt_)
        pos, neg = sample_pos_neg(gt_inds, heads.batch_size_per_image, heads.positive_fraction, choice, f"rcnn{stage}")
        gt_of = gt_inds[pos] - 1
        out.boxes.append(torch.cat([gts, p])[torch.cat([pos, neg])])
        out.labels.append(torch.cat([gl[gt_of], gl.new_full((neg.numel(),), k)]))
        out.gt_boxes.append(gts[gt_of])
        out.matched.append(gt_of)
        out.is_gt.append(torch.cat([pos < g, torch.zeros_like(neg, dtype=torch.bool)]))
    return out


def _refine(heads: CascadeRoIHeads, stage: int, sample: _Sample, cls: Tensor, reg: Tensor, image_shapes):
    """The next stage's proposals (§4.2 step 6): each sampled box regressed by its target label (background rows
    by the foreground argmax), clipped, the GT rows dropped."""
    k = heads.num_classes
    with torch.no_grad():
        labels = torch.cat(sample.labels)
        labels = torch.where(labels == k, cls[:, :k].argmax(1), labels)
        deltas = heads.bbox_head[stage].deltas_for(reg.detach(), labels)
        out, start = [], 0
        for b, g, shape in zip(sample.boxes, sample.is_gt, image_shapes, strict=True):
            n = b.shape[0]
            out.append(delta2bbox(b, deltas[start : start + n], heads.stds[stage], shape)[~g])
            start += n
    return out


def _box_losses(heads: CascadeRoIHeads, stage: int, sample: _Sample, cls: Tensor, reg: Tensor) -> dict[str, Tensor]:
    """Cross-entropy over every sampled RoI, accuracy, and the box loss summed over the positives / all RoIs:
    GIoU x10 on the decoded (unclipped) boxes (Cascade) or SmoothL1 (beta 1) on the encoded deltas (HTC++)."""
    k, head = heads.num_classes, heads.bbox_head[stage]
    labels = torch.cat(sample.labels)
    rois = torch.cat(sample.boxes)
    pos = labels < k
    gt = torch.cat(sample.gt_boxes)
    deltas = head.deltas_for(reg[pos], labels[pos])
    if heads.box_loss == "giou":
        loss_bbox = 10.0 * giou_loss(delta2bbox(rois[pos], deltas, heads.stds[stage]), gt).sum() / rois.shape[0]
    else:
        target = bbox2delta(rois[pos], gt, heads.stds[stage])
        loss_bbox = F.smooth_l1_loss(deltas, target, beta=1.0, reduction="sum") / rois.shape[0]
    return {
        "loss_cls": F.cross_entropy(cls, labels),
        "loss_bbox": loss_bbox,
        "acc": 100.0 * (cls.argmax(1) == labels).float().mean().detach(),
    }


def _mask_loss(logits: Tensor, sample: _Sample, targets) -> tuple[Tensor, Tensor]:
    """BCE of each positive's class channel against its GT mask, RoI-aligned and binarised (mean over P x 28 x 28);
    returns (loss, mask targets)."""
    from adapterctl.models.detector import _mask_targets

    size = logits.shape[-1]
    rows = zip(targets, sample.positives(), sample.matched, strict=True)
    mask_t = torch.cat([_mask_targets(t["masks"], r, m, size) for t, r, m in rows])
    labels = torch.cat([lab[: m.numel()] for lab, m in zip(sample.labels, sample.matched, strict=True)])
    if mask_t.numel() == 0:
        return logits.sum() * 0, mask_t
    chosen = logits[torch.arange(labels.numel(), device=logits.device), labels]
    return F.binary_cross_entropy_with_logits(chosen, mask_t), mask_t


def _stage_losses(self: CascadeRoIHeads, features, proposals, image_shapes, targets, record=None):
    """mmdet ``CascadeRoIHead.forward_train`` for every image of the batch (§4.2)."""
    choice = self.sampler or RandomChoice()
    losses: dict[str, Tensor] = {}
    props = [p.detach() for p in proposals]
    for i, (head, mask_head) in enumerate(zip(self.bbox_head, self.mask_head, strict=True)):
        w = self.stage_loss_weights[i]
        sample = _sample(self, i, props, targets, choice)
        cls, reg = head(self.box_features(features, sample.boxes, image_shapes))
        box = _box_losses(self, i, sample, cls, reg)
        mask_logits = mask_head(self.mask_features(features, sample.positives(), image_shapes))
        loss_mask, mask_t = _mask_loss(mask_logits, sample, targets)
        losses.update({f"loss_cls.s{i}": w * box["loss_cls"], f"loss_bbox.s{i}": w * box["loss_bbox"],
                       f"loss_mask.s{i}": w * loss_mask, f"acc.s{i}": box["acc"]})  # fmt: skip
        if record is not None:
            record.setdefault("stages", []).append(
                {"rois": torch.cat(sample.boxes), "labels": torch.cat(sample.labels), "cls_score": cls,
                 "bbox_pred": reg, "mask_targets": mask_t}
            )  # fmt: skip
        if i < len(self.bbox_head) - 1:
            props = _refine(self, i, sample, cls, reg, image_shapes)
    return losses


CascadeRoIHeads.losses = _stage_losses
