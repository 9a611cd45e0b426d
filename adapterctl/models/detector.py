"""Mask R-CNN on ViT-Adapter, assembled from torchvision's parts (``GeneralizedRCNN``, RPN, RoI heads, FPN) with
the subclasses below, to compute what mmdet 2.22 computed in the official experiments (heads.md §3-5).

What differs from torchvision's defaults, and where it is fixed here:
- anchors: no rounding of the base anchors, fixed strides 4..64 (P6 at 64)          -> ``MMAnchorGenerator``
- RoIAlign: ``aligned=True``, ``sampling_ratio=0``, fixed 1/stride scales            -> ``MMRoIAlign``
- box deltas clamped on both sides                                                   -> ``MMBoxCoder``
- L1 box losses (RPN and RoI), binarised ``aligned`` mask targets                    -> ``MMRPN``, ``MMRoIHeads``
- 1000 proposals after NMS in training; no internal resize (the data pipeline resizes with mmdet's rounding);
  masks pasted with float boxes and ``grid_sample``, thresholded at 0.5              -> ``MMTransform``
Everything else (RoIAlign, NMS, anchor grids, box coding, samplers) is torchvision's.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, nms, roi_align
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import LevelMapper, _convert_to_roi_format

_CPU = torch.device("cpu")


def exporting() -> bool:
    """True while ``torch.export`` / the ONNX exporter trace the model: sizes that depend on the data are then
    symbolic, so no Python branch may read them (the export paths below take the branch-free form)."""
    return torch.compiler.is_exporting()


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's ``batched_nms``; while exporting always its class-offset form (torchvision picks the form by
    the box count, a data-dependent size)."""
    if not exporting():
        return box_ops.batched_nms(boxes, scores, idxs, iou_threshold)
    top = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()  # = boxes.max() (clipped boxes), defined when empty
    return nms(boxes + (idxs.to(boxes) * (top + 1))[:, None], scores, iou_threshold)


class MMAnchorGenerator(AnchorGenerator):
    """mmdet's anchors: unrounded base anchors, strides fixed per level (not inferred from the padded size)."""

    def __init__(
        self,
        sizes: Sequence[Sequence[int]],
        aspect_ratios: Sequence[Sequence[float]],
        strides: Sequence[int] = (4, 8, 16, 32, 64),
    ) -> None:
        super().__init__(tuple(tuple(s) for s in sizes), tuple(tuple(a) for a in aspect_ratios))
        self.strides = [int(s) for s in strides]

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=_CPU) -> Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        device = feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides[: len(grid_sizes)]]
        self.set_cell_anchors(feature_maps[0].dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


class MMRoIAlign(MultiScaleRoIAlign):
    """Multi-level RoIAlign with ``aligned=True``, ``sampling_ratio=0`` and fixed scales 1/stride."""

    def __init__(self, featmap_names: Sequence[str], output_size: int, strides: Sequence[int] = (4, 8, 16, 32)) -> None:
        super().__init__(list(featmap_names), output_size, sampling_ratio=0)
        self.scales = [1.0 / s for s in strides]
        levels = [int(math.log2(s)) for s in strides]
        # mmdet finest_scale=56: thresholds 112/224/448, as torchvision's canonical 224 at level 4
        self.map_levels = LevelMapper(levels[0], levels[-1], canonical_scale=224, canonical_level=4, eps=1e-6)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = [v for k, v in x.items() if k in self.featmap_names]
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes)
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], *self.output_size))
        for lvl, (feat, scale) in enumerate(zip(feats, self.scales, strict=True)):
            idx = torch.where(levels == lvl)[0]
            if exporting() or idx.numel():
                pooled = roi_align(feat, rois[idx], self.output_size, scale, sampling_ratio=0, aligned=True)
                out[idx] = pooled.to(out.dtype)
        return out


class MMBoxCoder(det_utils.BoxCoder):
    """Delta decoding with dw/dh clamped to +-log(1000/16) (mmdet's ``max_ratio``), not only from above."""

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        clip, w = self.bbox_xform_clip, self.weights
        rel = rel_codes.clone()
        rel[:, 2::4] = rel[:, 2::4].clamp(min=-clip * w[2])
        rel[:, 3::4] = rel[:, 3::4].clamp(min=-clip * w[3])
        return super().decode_single(rel, boxes)


class MMRPN(RegionProposalNetwork):
    """RPN with mmdet's L1 box loss (torchvision uses smooth L1 with beta 1/9) and its two-sided delta clamp."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.box_coder = MMBoxCoder((1.0, 1.0, 1.0, 1.0))

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        """torchvision's proposal selection (per-level top-n by score, sigmoid, clip, drop tiny and low-scoring
        boxes, NMS per level, the first ``post_nms_top_n``) through :func:`batched_nms` (exportable)."""
        n = proposals.shape[0]
        objectness = objectness.detach().reshape(n, -1)
        levels = torch.cat([torch.full((k,), i, dtype=torch.int64, device=proposals.device)
                            for i, k in enumerate(num_anchors_per_level)])  # fmt: skip
        top = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch = torch.arange(n, device=proposals.device)[:, None]
        objectness, proposals = objectness[batch, top], proposals[batch, top]
        levels = levels[None].expand(n, -1)[batch, top]
        out_boxes, out_scores = [], []
        for boxes, scores, lvl, shape in zip(proposals, objectness.sigmoid(), levels, image_shapes, strict=True):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            keep = box_ops.remove_small_boxes(boxes, self.min_size)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = torch.where(scores >= self.score_thresh)[0]
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            out_boxes.append(boxes[keep])
            out_scores.append(scores[keep])
        return out_boxes, out_scores

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos))[0]
        neg = torch.where(torch.cat(neg))[0]
        sampled = torch.cat([pos, neg])
        labels_all = torch.cat(labels)
        targets = torch.cat(regression_targets)
        box_loss = F.l1_loss(pred_bbox_deltas[pos], targets[pos], reduction="sum") / sampled.numel()
        obj_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels_all[sampled])
        return obj_loss, box_loss


def _mask_targets(gt_masks: Tensor, boxes: Tensor, matched: Tensor, size: int) -> Tensor:
    """mmdet mask targets: aligned RoIAlign of the GT masks on the proposals, binarised at 0.5."""
    h, w = gt_masks.shape[-2:]
    b = boxes.clone()
    b[:, 0::2] = b[:, 0::2].clamp(0, w)
    b[:, 1::2] = b[:, 1::2].clamp(0, h)
    rois = torch.cat([matched[:, None].to(b), b], dim=1)
    t = roi_align(gt_masks[:, None].to(b), rois, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return (t[:, 0] >= 0.5).to(b.dtype)


class MMRoIHeads(RoIHeads):
    """RoI heads whose training losses are mmdet's (L1 box loss over all sampled RoIs, binarised mask targets);
    inference is torchvision's, with mmdet's two-sided delta clamp."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.box_coder = MMBoxCoder(kwargs["bbox_reg_weights"])

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        """torchvision's (softmax, per-class boxes clipped, background dropped, score threshold, tiny boxes
        dropped, NMS per class, the first ``detections_per_img``) through :func:`batched_nms` (exportable)."""
        k = class_logits.shape[-1]
        counts = [p.shape[0] for p in proposals]
        all_boxes = self.box_coder.decode(box_regression, proposals).split(counts, 0)
        all_scores = F.softmax(class_logits, -1).split(counts, 0)
        out_boxes, out_scores, out_labels = [], [], []
        for boxes, scores, shape in zip(all_boxes, all_scores, image_shapes, strict=True):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            labels = torch.arange(k, device=scores.device).view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            out_boxes.append(boxes[keep])
            out_scores.append(scores[keep])
            out_labels.append(labels[keep])
        return out_boxes, out_scores, out_labels

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_logits, box_regression = self.box_predictor(
            self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        )
        labels_all = torch.cat(labels)
        targets_all = torch.cat(regression_targets)
        loss_cls = F.cross_entropy(class_logits, labels_all)
        pos = torch.where(labels_all > 0)[0]
        reg = box_regression.reshape(class_logits.shape[0], -1, 4)
        loss_box = F.l1_loss(reg[pos, labels_all[pos]], targets_all[pos], reduction="sum") / labels_all.numel()
        losses = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        if self.has_mask():
            keep = [torch.where(lab > 0)[0] for lab in labels]
            mask_props = [p[k] for p, k in zip(proposals, keep, strict=True)]
            mask_matched = [m[k] for m, k in zip(matched_idxs, keep, strict=True)]
            logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_props, image_shapes)))
            size = logits.shape[-1]
            gt_labels = torch.cat([t["labels"][m] for t, m in zip(targets, mask_matched, strict=True)])
            mask_t = torch.cat(
                [
                    _mask_targets(t["masks"], p, m, size)
                    for t, p, m in zip(targets, mask_props, mask_matched, strict=True)
                ]
            )
            if mask_t.numel() == 0:
                losses["loss_mask"] = logits.sum() * 0
            else:
                chosen = logits[torch.arange(gt_labels.numel(), device=logits.device), gt_labels]
                losses["loss_mask"] = F.binary_cross_entropy_with_logits(chosen, mask_t)
        return [], losses


def paste_masks(probs: Tensor, boxes: Tensor, h: int, w: int, threshold: float = 0.5) -> Tensor:
    """mmdet ``_do_paste_mask``: float boxes, pixel centres, bilinear ``grid_sample``, ``>= threshold``.

    probs: (N, M, M) mask probabilities; boxes: (N, 4) in the output frame. Returns (N, h, w) bool.
    """
    out = torch.zeros((probs.shape[0], h, w), dtype=torch.bool, device=probs.device)
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        x0i, y0i = max(math.floor(x1) - 1, 0), max(math.floor(y1) - 1, 0)
        x1i, y1i = min(math.ceil(x2) + 1, w), min(math.ceil(y2) + 1, h)
        if x1i <= x0i or y1i <= y0i:
            continue
        gx = (torch.arange(x0i, x1i, device=probs.device, dtype=torch.float32) + 0.5 - x1) / (x2 - x1) * 2 - 1
        gy = (torch.arange(y0i, y1i, device=probs.device, dtype=torch.float32) + 0.5 - y1) / (y2 - y1) * 2 - 1
        gx = torch.nan_to_num(gx, posinf=0.0, neginf=0.0)  # mmdet maps inf (zero-size boxes) to 0
        gy = torch.nan_to_num(gy, posinf=0.0, neginf=0.0)
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), -1)[None]
        sampled = F.grid_sample(probs[i][None, None].float(), grid, align_corners=False)[0, 0]
        out[i, y0i:y1i, x0i:x1i] = sampled >= threshold
    return out


def paste_masks_dense(probs: Tensor, boxes: Tensor, h: int, w: int, threshold: float = 0.5) -> Tensor:
    """The full-canvas paste (mmdet's GPU rule, ``skip_empty=False``) without a loop over detections: bilinear
    sampling with zero padding is separable, so each mask is ``Wy @ P @ Wx^T`` with 1-D interpolation matrices.
    Equal to :func:`paste_masks` inside each box's window (up to float rounding); outside it, large boxes can set
    a few more pixels, as mmdet on GPU does. (N, M, M), (N, 4) -> (N, h, w) bool."""
    m = probs.shape[-1]

    def weights(x0: Tensor, x1: Tensor, n: int) -> Tensor:  # (N, n, M): output pixel -> mask cell weights
        g = ((torch.arange(n, device=probs.device, dtype=torch.float32) + 0.5)[None] - x0[:, None]) / (x1 - x0)[:, None]
        u = torch.nan_to_num(g * 2 - 1, posinf=0.0, neginf=0.0)
        u = ((u + 1) * m - 1) / 2  # grid_sample's unnormalisation, align_corners=False
        i0 = torch.floor(u)
        frac = u - i0
        cells = torch.arange(m, device=probs.device, dtype=torch.float32)
        return (cells == i0[..., None]) * (1 - frac)[..., None] + (cells == i0[..., None] + 1) * frac[..., None]

    b = boxes.float()
    wy, wx = weights(b[:, 1], b[:, 3], h), weights(b[:, 0], b[:, 2], w)
    return (wy @ probs.float() @ wx.transpose(1, 2)) >= threshold


class MMTransform(GeneralizedRCNNTransform):
    """Normalise and pad to the size divisor; no resize (the data pipeline resizes with mmdet's rounding).
    Post-processing maps boxes to the original image and pastes masks there."""

    def __init__(self, image_mean, image_std, size_divisible: int = 32, mask_threshold: float = 0.5) -> None:
        super().__init__(800, 1333, list(image_mean), list(image_std), size_divisible=size_divisible)
        self.mask_threshold = mask_threshold

    def resize(self, image: Tensor, target=None):
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training:
            return result
        for r, shape, orig in zip(result, image_shapes, original_image_sizes, strict=True):
            r["boxes"] = resize_boxes(r["boxes"], shape, orig)
            if "masks" in r:
                r["mask_probs"] = r["masks"][:, 0]
                r["masks"] = paste_masks(r["masks"][:, 0], r["boxes"], int(orig[0]), int(orig[1]), self.mask_threshold)[
                    :, None
                ]
        return result


class DetBackbone(nn.Module):
    """A backbone with ``feature_info`` (channels and strides of its maps), plus torchvision's FPN with the extra
    max-pooled P6. Declares ``out_channels`` and ``strides`` (the backbone's, then twice the last) for the heads."""

    def __init__(self, body: nn.Module, out_channels: int = 256, norm_groups: int | None = None) -> None:
        """``norm_groups``: mmdet's FPN ``norm_cfg=GN`` (each lateral and output conv without bias, then a
        GroupNorm of that many groups, no activation); None: plain convs with bias."""
        super().__init__()
        self.body = body
        info = body.feature_info
        norm = partial(nn.GroupNorm, int(norm_groups)) if norm_groups else None
        self.fpn = FeaturePyramidNetwork(
            [int(f["num_chs"]) for f in info], out_channels, extra_blocks=LastLevelMaxPool(), norm_layer=norm
        )
        self.out_channels = out_channels
        reductions = [int(f["reduction"]) for f in info]
        self.strides = (*reductions, 2 * reductions[-1])
        for m in self.fpn.modules():  # mmdet's FPN init: xavier-uniform convs, zero bias
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


class AdapterMaskRCNN(GeneralizedRCNN):
    """Mask R-CNN with the mmdet 2.22 settings of the ViT-Adapter COCO configs, assembled once from torchvision's
    parts (with the ``MM*`` subclasses above).

    Images enter unnormalised (RGB, 0-255), already resized by the data pipeline; ``forward`` takes their
    original sizes so that boxes and masks come back in original pixels. Training returns the ``loss_*`` dict,
    inference a list of ``{boxes, labels, scores, masks, mask_probs}`` (labels 1..K; 0 is the background).

    Args:
        backbone: a :class:`DetBackbone` (``out_channels``, ``strides``; returns an OrderedDict ``'0'..'3', 'pool'``).
        num_classes: foreground classes K.
        representation_size: box head fc width (1024); mask_channels: mask head conv width (256).
    """

    def __init__(
        self,
        backbone: DetBackbone,
        num_classes: int,
        *,
        image_mean: Sequence[float] = (123.675, 116.28, 103.53),
        image_std: Sequence[float] = (58.395, 57.12, 57.375),
        representation_size: int = 1024,
        mask_channels: int = 256,
        rpn_post_nms_top_n_train: int = 1000,
        box_batch_size_per_image: int = 512,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        mask_threshold: float = 0.5,
    ) -> None:
        c, strides = backbone.out_channels, backbone.strides
        names = [str(i) for i in range(len(strides) - 1)]  # the RoI levels; the last (P6) feeds the RPN only
        anchors = MMAnchorGenerator(
            sizes=[(8 * s,) for s in strides], aspect_ratios=[(0.5, 1.0, 2.0)] * len(strides), strides=strides
        )
        rpn = self._make_rpn(
            anchor_generator=anchors,
            head=RPNHead(c, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_top_n=dict(training=2000, testing=1000),
            post_nms_top_n=dict(training=rpn_post_nms_top_n_train, testing=1000),
            nms_thresh=0.7,
            score_thresh=0.0,
        )
        roi_heads = MMRoIHeads(
            box_roi_pool=MMRoIAlign(names, 7, strides[:-1]),
            box_head=TwoMLPHead(c * 7 * 7, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=box_batch_size_per_image,
            positive_fraction=0.25,
            bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
            score_thresh=box_score_thresh,
            nms_thresh=box_nms_thresh,
            detections_per_img=box_detections_per_img,
            mask_roi_pool=MMRoIAlign(names, 14, strides[:-1]),
            mask_head=MaskRCNNHeads(c, [mask_channels] * 4, 1),
            mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1),
        )
        super().__init__(backbone, rpn, roi_heads, MMTransform(image_mean, image_std, 32, mask_threshold))
        self.num_classes = num_classes
        self._init_heads()

    def _make_rpn(self, **kwargs) -> RegionProposalNetwork:
        return MMRPN(**kwargs)

    def _init_heads(self) -> None:
        """mmdet's head init (training from scratch): xavier fcs, N(0, .01) classifier, N(0, .001) regressor."""
        head, pred = self.roi_heads.box_head, self.roi_heads.box_predictor
        for fc in (head.fc6, head.fc7):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(pred.cls_score.weight, std=0.01)
        nn.init.normal_(pred.bbox_pred.weight, std=0.001)
        nn.init.zeros_(pred.cls_score.bias)
        nn.init.zeros_(pred.bbox_pred.bias)
        for m in self.rpn.head.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        for m in self.roi_heads.mask_predictor.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        original_sizes: list[tuple[int, int]] | None = None,
    ):
        """Training: ``targets`` given -> ``{loss_*}``. Inference -> detections in ``original_sizes`` pixels
        (default: the input sizes)."""
        if self.training and targets is None:
            raise ValueError("training needs targets")
        sizes = original_sizes or [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        proposals, proposal_losses = self.rpn(image_list, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        if self.training:
            return {**proposal_losses, **detector_losses}
        return self.transform.postprocess(detections, image_list.image_sizes, sizes)


def _background_first(v: Tensor) -> Tensor:  # mmdet's background class is its last row, torchvision's the first
    return torch.cat([v[-1:], v[:-1]])


def _pad_rows(n: int) -> Callable[[Tensor], Tensor]:  # a (never read) background block before class-specific rows
    return lambda v: torch.cat([v.new_zeros((n, *v.shape[1:])), v])


# mmdet 2.x key (regex) -> this model's key (format of the groups) and how the tensor changes (heads.md §4.3)
MMDET_KEYS: tuple[tuple[str, str, Callable[[Tensor], Tensor] | None], ...] = (
    (r"neck\.lateral_convs\.(\d+)\.conv\.(\w+)", "backbone.fpn.inner_blocks.{0}.0.{1}", None),
    (r"neck\.fpn_convs\.(\d+)\.conv\.(\w+)", "backbone.fpn.layer_blocks.{0}.0.{1}", None),
    (r"neck\.lateral_convs\.(\d+)\.gn\.(\w+)", "backbone.fpn.inner_blocks.{0}.1.{1}", None),  # norm_cfg=GN
    (r"neck\.fpn_convs\.(\d+)\.gn\.(\w+)", "backbone.fpn.layer_blocks.{0}.1.{1}", None),
    (r"rpn_head\.rpn_conv\.(\w+)", "rpn.head.conv.0.0.{0}", None),
    (r"rpn_head\.rpn_cls\.(\w+)", "rpn.head.cls_logits.{0}", None),
    (r"rpn_head\.rpn_reg\.(\w+)", "rpn.head.bbox_pred.{0}", None),
    (r"roi_head\.bbox_head\.shared_fcs\.0\.(\w+)", "roi_heads.box_head.fc6.{0}", None),
    (r"roi_head\.bbox_head\.shared_fcs\.1\.(\w+)", "roi_heads.box_head.fc7.{0}", None),
    (r"roi_head\.bbox_head\.fc_cls\.(\w+)", "roi_heads.box_predictor.cls_score.{0}", _background_first),
    (r"roi_head\.bbox_head\.fc_reg\.(\w+)", "roi_heads.box_predictor.bbox_pred.{0}", _pad_rows(4)),
    (r"roi_head\.mask_head\.convs\.(\d+)\.conv\.(\w+)", "roi_heads.mask_head.{0}.0.{1}", None),
    (r"roi_head\.mask_head\.upsample\.(\w+)", "roi_heads.mask_predictor.conv5_mask.{0}", None),
    (r"roi_head\.mask_head\.conv_logits\.(\w+)", "roi_heads.mask_predictor.mask_fcn_logits.{0}", _pad_rows(1)),
)


def convert_mmdet_heads(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """mmdet 2.x ``neck.*``, ``rpn_head.*``, ``roi_head.*`` keys -> this model's keys, by :data:`MMDET_KEYS`.
    Returns the tensors and the keys no row matches."""
    import re

    rows = [(re.compile(pattern), target, change) for pattern, target, change in MMDET_KEYS]
    out: dict[str, Tensor] = {}
    left: list[str] = []
    for key, v in state_dict.items():
        for pattern, target, change in rows:
            if m := pattern.fullmatch(key):
                out[target.format(*m.groups())] = change(v) if change else v
                break
        else:
            left.append(key)
    return out, left


def _shape_overrides(full: dict[str, Tensor], rows: Sequence[tuple[str, str]]) -> list[str]:
    return [f"head.{name}={full[key].shape[0]}" for key, name in rows if key in full]


def mmdet_maskrcnn_overrides(full: dict[str, Tensor]) -> list[str]:
    """Class count and head widths read off an official Mask R-CNN state dict."""
    out = []
    cls = full.get("roi_head.bbox_head.fc_cls.weight")
    if cls is not None:
        out += [f"head.num_classes={cls.shape[0] - 1}", f"data.num_classes={cls.shape[0] - 1}"]
    return out + _shape_overrides(
        full,
        [("neck.fpn_convs.0.conv.weight", "fpn_channels"),
         ("roi_head.bbox_head.shared_fcs.0.weight", "representation_size"),
         ("roi_head.mask_head.convs.0.conv.weight", "mask_channels")],
    )  # fmt: skip


def mmdet_cascade_overrides(full: dict[str, Tensor]) -> list[str]:
    """Class count and head widths read off an official Cascade Mask R-CNN state dict."""
    cls = full["roi_head.bbox_head.0.fc_cls.weight"]
    return [f"head.num_classes={cls.shape[0] - 1}", f"data.num_classes={cls.shape[0] - 1}"] + _shape_overrides(
        full,
        [("neck.fpn_convs.0.conv.weight", "fpn_channels"),
         ("roi_head.bbox_head.0.shared_convs.0.conv.weight", "conv_channels"),
         ("roi_head.bbox_head.0.shared_fcs.0.weight", "fc_channels"),
         ("roi_head.mask_head.0.convs.0.conv.weight", "mask_channels")],
    )  # fmt: skip


class AdapterCascadeMaskRCNN(AdapterMaskRCNN):
    """Cascade Mask R-CNN of the ViT-Adapter COCO configs: the Mask R-CNN backbone, FPN and anchors, the RPN
    trained as mmdet's (:class:`~adapterctl.models.rpn.SampledRPN`, training proposals capped at 2000) and
    :class:`~adapterctl.models.cascade.CascadeRoIHeads` in place of the RoI heads. The sampling draws of the RPN
    and every stage go through one :class:`~adapterctl.models.assign.RandomChoice` (:meth:`set_sampler`).

    Args (beyond :class:`AdapterMaskRCNN`'s): conv_channels / fc_channels: the box heads' 4 convs and fc (256,
    1024); mask_channels: the mask heads' width (256).
    """

    def __init__(
        self, backbone: DetBackbone, num_classes: int, *, conv_channels: int = 256, fc_channels: int = 1024,
        mask_channels: int = 256, box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100, box_batch_size_per_image: int = 512, **kwargs,
    ) -> None:  # fmt: skip
        from adapterctl.models.cascade import build_cascade_roi_heads

        kwargs.setdefault("rpn_post_nms_top_n_train", 2000)
        super().__init__(backbone, num_classes, mask_channels=mask_channels, **kwargs)
        self.roi_heads = build_cascade_roi_heads(
            backbone.out_channels, backbone.strides[:-1], num_classes, conv_channels=conv_channels,
            fc_channels=fc_channels, mask_channels=mask_channels, score_thresh=box_score_thresh,
            nms_thresh=box_nms_thresh, detections_per_img=box_detections_per_img,
            batch_size_per_image=box_batch_size_per_image,
        )  # fmt: skip

    def _make_rpn(self, **kwargs) -> RegionProposalNetwork:
        from adapterctl.models.rpn import SampledRPN

        return SampledRPN(allowed_border=0.0, smooth_l1_beta=1.0 / 9.0, min_pos_iou=0.3, low_quality=True, **kwargs)

    def set_sampler(self, choice) -> None:
        """Route every training draw (RPN, then the stages, in mmdet's call order) through ``choice``."""
        self.rpn.sampler = choice
        self.roi_heads.sampler = choice

    def _init_heads(self) -> None:  # the cascade heads initialise themselves; the RPN as Mask R-CNN's
        for m in self.rpn.head.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)


def convert_mmdet_cascade(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """An mmdet Cascade state dict -> this model's keys: neck and RPN by :data:`MMDET_KEYS`, ``roi_head.*`` ->
    ``roi_heads.*`` unchanged (the cascade heads keep mmdet's names and class order)."""
    common = {k: v for k, v in state_dict.items() if not k.startswith("roi_head.")}
    out, left = convert_mmdet_heads(common)
    out.update({"roi_heads." + k[len("roi_head.") :]: v for k, v in state_dict.items() if k.startswith("roi_head.")})
    return out, left


class HTCBackbone(DetBackbone):
    """:class:`DetBackbone` with HTC++'s ``ExtraAttention`` on the backbone's last map before the FPN."""

    def __init__(
        self, body: nn.Module, out_channels: int = 256, *, num_heads: int = 32, drop_path: float = 0.0,
        norm_groups: int | None = None,
    ) -> None:  # fmt: skip
        from adapterctl.models.htc import ExtraAttention

        super().__init__(body, out_channels, norm_groups)
        self.extra_attention = ExtraAttention(int(body.feature_info[-1]["num_chs"]), num_heads, drop_path=drop_path)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.extra_attention(list(self.body(x)))
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(maps)))


class AdapterHTC(AdapterCascadeMaskRCNN):
    """HTC++ of the ViT-Adapter COCO configs: :class:`HTCBackbone` (ExtraAttention + FPN), the mmdet-trained RPN
    (2000 training proposals) and :class:`~adapterctl.models.htc.HTCRoIHeads` (semantic branch, mask information
    flow, interleaving, soft-NMS). Training targets carry a ``semantic`` label map (COCO stuff maps, 255 void).

    Args (beyond :class:`AdapterMaskRCNN`'s): conv_channels / fc_channels: the box heads' widths (256, 1024);
    semantic_classes: the semantic branch's classes (183); box_score_thresh: 0.001.
    """

    def __init__(
        self, backbone: HTCBackbone, num_classes: int, *, conv_channels: int = 256, fc_channels: int = 1024,
        semantic_classes: int = 183, semantic_loss_weight: float = 0.2, box_score_thresh: float = 0.001,
        box_nms_thresh: float = 0.5, box_detections_per_img: int = 100, box_batch_size_per_image: int = 512,
        box_norm: bool = False, box_loss: str = "smooth_l1", **kwargs,
    ) -> None:  # fmt: skip
        from adapterctl.models.htc import build_htc_roi_heads

        kwargs.pop("mask_channels", None)  # the HTC mask heads are as wide as the FPN
        super().__init__(backbone, num_classes, box_batch_size_per_image=box_batch_size_per_image, **kwargs)
        self.roi_heads = build_htc_roi_heads(
            backbone.out_channels, backbone.strides[:-1], num_classes, conv_channels=conv_channels,
            fc_channels=fc_channels, semantic_classes=semantic_classes, semantic_loss_weight=semantic_loss_weight,
            score_thresh=box_score_thresh, nms_thresh=box_nms_thresh, detections_per_img=box_detections_per_img,
            batch_size_per_image=box_batch_size_per_image, box_norm=box_norm, box_loss=box_loss,
        )  # fmt: skip

    def aug_test(
        self, image: Tensor, scales: Sequence[Sequence[int]], *, flip: bool = True,
        scale_ranges: Sequence[Sequence[str]] | None = None, max_per_img: int = 1000,
    ) -> dict:  # fmt: skip
        """The official ``_ms`` test (:mod:`adapterctl.models.htc_aug`) of one unresized image (3, H, W), RGB
        0-255: detections in its pixels, as ``forward`` returns them."""
        from adapterctl.models.htc_aug import aug_views, htc_aug_test

        views = aug_views(image, scales, flip, scale_ranges)
        return htc_aug_test(self, views, (int(image.shape[-2]), int(image.shape[-1])), max_per_img)


def mmdet_htc_overrides(full: dict[str, Tensor]) -> list[str]:
    """Class counts and head widths read off an official HTC++ state dict (the ExtraAttention's head count is not
    in the tensors: ``head.extra_attention_heads``, 32 in every official config)."""
    cls = full["roi_head.bbox_head.0.fc_cls.weight"]
    sem = full["roi_head.semantic_head.conv_logits.weight"]
    return [
        f"head.num_classes={cls.shape[0] - 1}", f"data.num_classes={cls.shape[0] - 1}",
        f"head.semantic_classes={sem.shape[0]}",
    ] + [
        f"head.box_norm={str('roi_head.bbox_head.0.shared_convs.0.bn.weight' in full).lower()}",
        # a GroupNorm FPN (the O365 config): the group count is not in the tensors; the config's is 32
        f"head.fpn_norm_groups={32 if 'neck.1.lateral_convs.0.gn.weight' in full else 'null'}",
    ] + _shape_overrides(
        full,
        [("neck.1.fpn_convs.0.conv.weight", "fpn_channels"),
         ("roi_head.bbox_head.0.shared_convs.0.conv.weight", "conv_channels"),
         ("roi_head.bbox_head.0.shared_fcs.0.weight", "fc_channels")],
    )  # fmt: skip


def convert_mmdet_htc(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """An mmdet HTC++ state dict -> this model's keys: ``neck.0.*`` (ExtraAttention) ->
    ``backbone.extra_attention.*``, ``neck.1.*`` (FPN) and the RPN by :data:`MMDET_KEYS`, ``roi_head.*`` ->
    ``roi_heads.*`` unchanged."""
    attn = {
        "backbone.extra_attention." + k[len("neck.0.") :]: v for k, v in state_dict.items() if k.startswith("neck.0.")
    }
    rest = {("neck." + k[len("neck.1.") :] if k.startswith("neck.1.") else k): v for k, v in state_dict.items()
            if not k.startswith("neck.0.")}  # fmt: skip
    out, left = convert_mmdet_cascade(rest)
    return {**attn, **out}, left
