"""The RPN as the Cascade and HTC++ configs train it (mmdet 2.22 ``RPNHead``; cascade_htc_README.md §4.1).

Inference is :class:`~adapterctl.models.detector.MMRPN`'s (torchvision's proposal selection). Training differs
from the Mask R-CNN RPN: anchors reaching outside the image are ignored (``allowed_border=0``), the assignment is
mmdet's ``MaxIoUAssigner`` with every best-IoU anchor of a GT assigned to it, 256 anchors sampled through the
model's :class:`~adapterctl.models.assign.RandomChoice`, and the box loss is SmoothL1 (beta 1/9); both losses are
normalised by the number of sampled anchors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers

from adapterctl.models.assign import RandomChoice, max_iou_assign, sample_pos_neg
from adapterctl.models.detector import MMRPN


def _encode(anchors: Tensor, gt: Tensor) -> Tensor:  # mmdet DeltaXYWHBBoxCoder.encode, means 0, stds 1
    from adapterctl.models.cascade import bbox2delta

    return bbox2delta(anchors, gt, (1.0, 1.0, 1.0, 1.0))


class SampledRPN(MMRPN):
    """An RPN trained with mmdet's assigner, sampler and SmoothL1 loss (module docstring).

    Args (beyond torchvision's): allowed_border: how far (px) an anchor may reach outside the image and still
    train (negative: no limit); smooth_l1_beta: the box loss's beta; min_pos_iou: the low-quality match floor;
    low_quality: mmdet's ``match_low_quality``.
    """

    def __init__(
        self, *, allowed_border: float = 0.0, smooth_l1_beta: float = 1.0 / 9.0, min_pos_iou: float = 0.3,
        low_quality: bool = True, **kwargs,
    ) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.allowed_border, self.beta = allowed_border, smooth_l1_beta
        self.min_pos_iou, self.low_quality = min_pos_iou, low_quality
        self.sampler: RandomChoice | None = None

    def forward(self, images: ImageList, features: dict[str, Tensor], targets=None, record: dict | None = None):
        maps = list(features.values())
        objectness, deltas = self.head(maps)
        anchors = self.anchor_generator(images, maps)
        per_level = [int(o[0].numel()) for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, images.image_sizes, per_level)
        if not self.training:
            return boxes, {}
        if targets is None:
            raise ValueError("targets should not be None")
        if record is not None:
            record["proposals"] = boxes
        return boxes, self.losses(objectness, deltas, anchors, images.image_sizes, targets, per_level, record)

    def inside(self, anchors: Tensor, image_size: tuple[int, int]) -> Tensor:
        """mmdet ``anchor_inside_flags`` against ``img_shape`` (strict ``<`` on the far sides)."""
        if self.allowed_border < 0:
            return torch.ones(anchors.shape[0], dtype=torch.bool, device=anchors.device)
        h, w = image_size
        b = self.allowed_border
        return (anchors[:, 0] >= -b) & (anchors[:, 1] >= -b) & (anchors[:, 2] < w + b) & (anchors[:, 3] < h + b)

    def losses(self, objectness, deltas, anchors, image_sizes, targets, per_level, record=None) -> dict[str, Tensor]:
        choice = self.sampler or RandomChoice()
        # targets and losses in float32 (under autocast the anchors follow the bf16 feature maps)
        anchors, objectness, deltas = [a.float() for a in anchors], objectness.float(), deltas.float()
        labels, weights, box_targets, pos_mask = [], [], [], []
        for a, size, t in zip(anchors, image_sizes, targets, strict=True):
            inside = self.inside(a, size)
            idx = torch.where(inside)[0]
            gt = t["boxes"]
            gt_inds, max_ov = max_iou_assign(a[idx], gt, 0.7, 0.3, self.min_pos_iou, self.low_quality)
            pos, neg = sample_pos_neg(gt_inds, 256, 0.5, choice, "rpn")
            lab = a.new_zeros(a.shape[0])
            w = a.new_zeros(a.shape[0])
            tgt = a.new_zeros(a.shape)
            is_pos = torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
            lab[idx[pos]] = 1.0
            w[idx[pos]] = 1.0
            w[idx[neg]] = 1.0
            is_pos[idx[pos]] = True
            if pos.numel():
                tgt[idx[pos]] = _encode(a[idx[pos]], gt[gt_inds[pos] - 1])
            labels.append(lab)
            weights.append(w)
            box_targets.append(tgt)
            pos_mask.append(is_pos)
            if record is not None:
                record.setdefault("images", []).append(
                    {"inside_flags": inside, "assign_gt_inds": gt_inds, "assign_max_overlaps": max_ov,
                     "pos_inds": pos, "neg_inds": neg}
                )  # fmt: skip
        lab, w, tgt, is_pos = torch.cat(labels), torch.cat(weights), torch.cat(box_targets), torch.cat(pos_mask)
        n = w.sum().clamp(min=1.0)
        cls = F.binary_cross_entropy_with_logits(objectness.flatten(), lab, reduction="none") * w
        box = F.smooth_l1_loss(deltas, tgt, beta=self.beta, reduction="none").sum(1) * is_pos
        if record is not None:  # per FPN level, as mmdet reports them
            level = torch.repeat_interleave(torch.arange(len(per_level)), torch.tensor(per_level)).to(cls.device)
            level = level.repeat(len(anchors))
            record["loss_cls"] = [cls[level == i].sum() / n for i in range(len(per_level))]
            record["loss_bbox"] = [box[level == i].sum() / n for i in range(len(per_level))]
        return {"loss_objectness": cls.sum() / n, "loss_rpn_box_reg": box.sum() / n}
