"""HTC++'s multi-scale + flip test: the official ``HybridTaskCascadeAug.aug_test_vote`` of the ``_ms`` configs
(ViT-Adapter ``detection/mmdet_custom``; mmdet 2.22 box mapping, ``merge_aug_masks``, ``multiclass_nms``).

Per view (each scale of ``MultiScaleFlipAug``, then its horizontal flip; mmdet's keep-ratio resize and rounding):

1. the view's own RPN proposals (no merging across views), the three box stages, the mean of their logits,
   softmax, and the last stage's class-agnostic boxes clipped to the view (``get_bboxes`` without NMS);
2. the boxes mapped back to the original image (un-flip, then divide by the view's scale factor) and only those
   whose area lies in the view's size ranges kept (``scale_ranges``: ``s`` <= 32², 32² < ``m`` <= 96²,
   ``l`` > 96²; the configs keep large objects from the small scales and small ones from the large).

All views' survivors are concatenated and go through one soft-NMS ``multiclass_nms`` (score 0.001, IoU 0.5,
1000 detections). Masks: each detection mapped into every view, the three HTC mask heads with information flow on
that view's RoI + semantic features, their probabilities un-flipped, then the mean over views x stages, pasted
onto the original image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SIZE_RANGES = ("s", "m", "l")  # COCO's small / medium / large (GT area thresholds 32² and 96²)


@dataclass(frozen=True)
class AugView:
    """One test view: the resized (and maybe flipped) image and how it maps to the original."""

    image: Tensor  # (3, h, w), RGB 0-255
    scale_factor: tuple[float, float]  # (w_scale, h_scale) = new size / original size, per axis
    flip: bool
    ranges: tuple[str, ...] | None  # the box sizes this view contributes; None: all

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])


def check_scale_ranges(ranges, n_scales: int, where: str) -> list[tuple[str, ...]] | None:
    """``ranges``: one list of size names (s, m, l) per scale, or None. A ``ValueError`` names ``where``."""
    if ranges is None:
        return None
    ranges = [tuple(str(r) for r in rs) for rs in ranges]
    if len(ranges) != n_scales:
        raise ValueError(f"{where} has {len(ranges)} entries for {n_scales} test scales (one list per scale)")
    for rs in ranges:
        bad = [r for r in rs if r not in SIZE_RANGES]
        if bad or not rs:
            raise ValueError(f"{where}: each entry lists sizes among s, m, l; got {list(rs)}")
    return ranges


def aug_views(
    image: Tensor, scales: Sequence[Sequence[int]], flip: bool = True, ranges: Sequence[Sequence[str]] | None = None
) -> list[AugView]:
    """mmdet ``MultiScaleFlipAug`` with keep-ratio ``Resize`` and ``RandomFlip``: for each scale the resized image,
    then (``flip``) its mirror; ``ranges[i]`` goes with both views of scale ``i``."""
    from adapterctl.data.transforms import rescale_size, resize_image

    ranges = check_scale_ranges(ranges, len(scales), "scale_ranges")
    h, w = int(image.shape[-2]), int(image.shape[-1])
    views = []
    for i, scale in enumerate(scales):
        nh, nw = rescale_size(h, w, [int(v) for v in scale])
        resized = resize_image(image, (nh, nw))
        rs = tuple(ranges[i]) if ranges is not None else None
        for flipped in (False, True) if flip else (False,):
            views.append(AugView(resized.flip(-1) if flipped else resized, (nw / w, nh / h), flipped, rs))
    return views


def _factor(view: AugView, like: Tensor) -> Tensor:
    ws, hs = view.scale_factor
    return torch.tensor([ws, hs, ws, hs], dtype=torch.float32, device=like.device).to(like.dtype)


def _hflip(boxes: Tensor, width: int) -> Tensor:  # mmdet bbox_flip: x -> w - x
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def to_original(boxes: Tensor, view: AugView) -> Tensor:
    """mmdet ``bbox_mapping_back``: un-flip in the view, then divide by its scale factor."""
    boxes = _hflip(boxes, view.size[1]) if view.flip else boxes
    return boxes / _factor(view, boxes)


def to_view(boxes: Tensor, view: AugView) -> Tensor:
    """mmdet ``bbox_mapping``: multiply by the view's scale factor, then flip in the view."""
    boxes = boxes * _factor(view, boxes)
    return _hflip(boxes, view.size[1]) if view.flip else boxes


def in_ranges(boxes: Tensor, ranges: Sequence[str] | None) -> Tensor:
    """The indices of ``boxes`` whose area is in one of ``ranges`` (the official ``remove_boxes``)."""
    if ranges is None:
        return torch.arange(boxes.shape[0], device=boxes.device)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = area < 0.0
    if "s" in ranges:
        keep = keep | (area <= 32.0 * 32.0)
    if "m" in ranges:
        keep = keep | ((area > 32.0 * 32.0) & (area <= 96.0 * 96.0))
    if "l" in ranges:
        keep = keep | (area > 96.0 * 96.0)
    return torch.nonzero(keep, as_tuple=False).squeeze(1)


def view_candidates(model, view: AugView) -> tuple[Tensor, Tensor, dict, tuple[int, int]]:
    """One view's pre-NMS candidates in original pixels (boxes (N, 4), softmax scores (N, K+1)) after its size
    filter, plus its features (with the semantic embedding) and unpadded size for the mask pass."""
    from adapterctl.models.cascade import delta2bbox

    heads = model.roi_heads
    image_list, _ = model.transform([view.image])
    features = model.backbone(image_list.tensors)
    proposals, _ = model.rpn(image_list, features)
    shape = tuple(image_list.image_sizes[0])
    _, features = heads.semantic(features)
    stages = heads.stage_outputs(features, proposals[0], shape)
    scores = F.softmax(sum(s["cls_score"] for s in stages) / float(len(stages)), dim=-1)
    last = stages[-1]
    boxes = to_original(delta2bbox(last["rois"], last["bbox_pred"], heads.stds[-1], shape), view)
    keep = in_ranges(boxes, view.ranges)
    return boxes[keep], scores[keep], features, shape


def htc_aug_test(model, views: Sequence[AugView], original_size: tuple[int, int], max_per_img: int = 1000) -> dict:
    """The detections of an :class:`~adapterctl.models.detector.AdapterHTC` over ``views`` of one image, in
    original pixels: ``{boxes, scores, labels (1..K), masks (D, 1, H, W) bool, mask_probs (D, 28, 28)}``."""
    from adapterctl.models.detector import paste_masks
    from adapterctl.models.htc import multiclass_soft_nms

    heads = getattr(model, "roi_heads", None)
    if not hasattr(heads, "semantic"):
        raise TypeError("the multi-scale + flip test is HTC++'s (an AdapterHTC model)")
    boxes, scores, kept = [], [], []
    for view in views:
        b, s, features, shape = view_candidates(model, view)
        boxes.append(b)
        scores.append(s)
        kept.append((features, shape))
    det_boxes, det_scores, labels = multiclass_soft_nms(
        torch.cat(boxes), torch.cat(scores), heads.score_thresh, heads.nms_thresh, max_per_img
    )
    h, w = int(original_size[0]), int(original_size[1])
    if det_boxes.shape[0] == 0:
        probs = det_boxes.new_zeros((0, 28, 28))
    else:
        idx = torch.arange(det_boxes.shape[0], device=det_boxes.device)
        total, count = None, 0
        for view, (features, shape) in zip(views, kept, strict=True):
            feats = heads.mask_features(features, [to_view(det_boxes, view)], [shape])
            for logits in heads.mask_chain(feats, len(heads.mask_head) - 1, True):
                p = logits.sigmoid()[idx, labels].float()
                p = p.flip(-1) if view.flip else p  # merge_aug_masks: un-flip the probabilities
                total = p if total is None else total + p
                count += 1
        probs = total / count
    masks = paste_masks(probs, det_boxes, h, w, model.transform.mask_threshold)
    return {
        "boxes": det_boxes, "scores": det_scores, "labels": labels + 1, "masks": masks[:, None], "mask_probs": probs,
    }  # fmt: skip
