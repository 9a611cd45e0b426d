"""Detection training and test transforms as mmdet 2.22 runs them in the official COCO configs (heads.md §3.7):
keep-ratio resize with mmdet's rounding and flip (1x; ``range``: HTC++'s scale drawn from a range), and the
DETR-style multi-scale / resize-crop-resize pipeline with a final crop (3x). Boxes, masks and the semantic label
map (HTC++) move with the image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class DetTransform:
    """mmdet 2.x Resize (keep ratio, ``int(x * f + 0.5)`` rounding) and RandomFlip. The scale is one of ``scales``
    at random (``mode="value"``) or, ``mode="range"``, long and short sides drawn uniformly between the scales'
    (mmdet ``multiscale_mode='range'``). Boxes are scaled by the exact size ratios; masks and the semantic map
    resized nearest."""

    def __init__(self, scales: Sequence[Sequence[int]], flip_prob: float = 0.0, mode: str = "value") -> None:
        if mode not in ("value", "range"):
            raise ValueError(f"multi-scale mode must be value or range, got {mode!r}")
        if mode == "range" and len(scales) != 2:
            raise ValueError(f"range mode needs two scales (the range's ends), got {list(scales)}")
        self.scales = [tuple(int(v) for v in s) for s in scales]
        self.flip_prob, self.mode = flip_prob, mode

    def _scale(self, rng: np.random.Generator) -> tuple[int, ...]:
        if self.mode == "range":
            longs, shorts = [max(s) for s in self.scales], [min(s) for s in self.scales]
            return int(rng.integers(min(longs), max(longs) + 1)), int(rng.integers(min(shorts), max(shorts) + 1))
        return self.scales[int(rng.integers(len(self.scales)))] if len(self.scales) > 1 else self.scales[0]

    def __call__(self, image: torch.Tensor, target: dict, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        from adapterctl.data.transforms import rescale_size, resize_image, resize_label

        h, w = image.shape[-2:]
        nh, nw = rescale_size(h, w, self._scale(rng))
        image = resize_image(image, (nh, nw))
        target = dict(target)
        boxes = target["boxes"] * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        masks = target.get("masks")
        if masks is not None and masks.shape[0]:
            masks = torch.stack([resize_label(m, (nh, nw)) for m in masks])
        elif masks is not None:
            masks = torch.zeros((0, nh, nw), dtype=torch.uint8)
        if "semantic" in target:
            target["semantic"] = resize_label(target["semantic"], (nh, nw))
        if self.flip_prob and rng.random() < self.flip_prob:
            image = image.flip(-1)
            boxes = torch.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], dim=1)
            masks = masks.flip(-1) if masks is not None else None
            if "semantic" in target:
                target["semantic"] = target["semantic"].flip(-1)
        target["boxes"] = boxes
        if masks is not None:
            target["masks"] = masks
        return image, target


def _crop(image: torch.Tensor, target: dict, lo: int, hi: int, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
    """mmdet RandomCrop(crop_type='absolute_range', allow_negative_crop=True): a (h, w) in [lo, hi] (capped by the
    image) at a random offset; boxes shifted and clipped, boxes left without area dropped with their masks."""
    h, w = image.shape[-2:]
    ch = int(rng.integers(min(h, lo), min(h, hi) + 1))
    cw = int(rng.integers(min(w, lo), min(w, hi) + 1))
    y0 = int(rng.integers(0, max(h - ch, 0) + 1))
    x0 = int(rng.integers(0, max(w - cw, 0) + 1))
    image = image[:, y0 : y0 + ch, x0 : x0 + cw]
    boxes = target["boxes"] - torch.tensor([x0, y0, x0, y0], dtype=target["boxes"].dtype)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, cw)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ch)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = dict(target)
    out["boxes"] = boxes[keep]
    for key in ("labels", "iscrowd", "area"):
        if key in out:
            out[key] = out[key][keep]
    if "masks" in out:
        out["masks"] = out["masks"][keep][:, y0 : y0 + ch, x0 : x0 + cw]
    if "semantic" in out:
        out["semantic"] = out["semantic"][y0 : y0 + ch, x0 : x0 + cw]
    return image, out


class DetrTransform:
    """The 3x schedule's pipeline (DETR / Sparse R-CNN augmentation, heads.md §3.7): flip first; then with equal
    probability (A) a multi-scale resize, or (B) resize to a short side of 400/500/600, a random crop of 384-600
    and a multi-scale resize of the crop; finally a random crop of at most 1024 x 1024."""

    def __init__(
        self,
        scales: Sequence[Sequence[int]],
        crop_scales: Sequence[Sequence[int]] = ((1333, 400), (1333, 500), (1333, 600)),
        crop_range: Sequence[int] = (384, 600),
        final_crop: int = 1024,
        flip_prob: float = 0.5,
    ) -> None:
        self.resize = DetTransform(scales, 0.0)
        self.pre_crop = DetTransform(crop_scales, 0.0)
        self.crop_range = (int(crop_range[0]), int(crop_range[1]))
        self.final_crop = int(final_crop)
        self.flip_prob = flip_prob

    def __call__(self, image: torch.Tensor, target: dict, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        if self.flip_prob and rng.random() < self.flip_prob:
            w = image.shape[-1]
            image = image.flip(-1)
            target = dict(target)
            b = target["boxes"]
            target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
            for key in ("masks", "semantic"):
                if key in target:
                    target[key] = target[key].flip(-1)
        if rng.integers(2) == 0:
            image, target = self.resize(image, target, rng)
        else:
            image, target = self.pre_crop(image, target, rng)
            image, target = _crop(image, target, *self.crop_range, rng)
            image, target = self.resize(image, target, rng)
        return _crop(image, target, self.final_crop, self.final_crop, rng)
