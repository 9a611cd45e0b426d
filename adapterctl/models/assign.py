"""mmdet 2.22's training-time assignment and sampling, shared by the RPN and the cascade stages
(cascade_htc_README.md §4.1-4.3): ``MaxIoUAssigner``, ``RandomSampler`` and its one random draw.

The draws go through a :class:`RandomChoice` object held by the model (``model.set_sampler``), so a test replays
the official draws (:class:`ReplayChoice`) without patching the code under test.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class RandomChoice:
    """mmdet ``RandomSampler.random_choice``: ``gallery[torch.randperm(len)[:num]]`` on the global generator (or
    ``generator``). Subclass it (or use :class:`ReplayChoice`) to inject the draws."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, name: str, gallery: Tensor, num: int) -> Tensor:
        perm = torch.randperm(gallery.numel(), generator=self.generator)[:num].to(gallery.device)
        return gallery[perm]


class ReplayChoice(RandomChoice):
    """Stored draws in call order (the fixtures' ``random_choice_calls`` results)."""

    def __init__(self, results: Sequence[Tensor]) -> None:
        super().__init__()
        self.results = list(results)

    def __call__(self, name: str, gallery: Tensor, num: int) -> Tensor:
        if not self.results:
            raise RuntimeError(f"no stored draw left for {name} ({num} of {gallery.numel()})")
        return self.results.pop(0).to(gallery.device)


def box_iou_mm(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """mmdet ``bbox_overlaps`` (IoU, no +1, eps on the union): (N, M)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = torch.clamp(area_a[:, None] + area_b[None, :] - overlap, min=eps)
    return overlap / union


def max_iou_assign(
    boxes: Tensor, gt: Tensor, pos_thr: float, neg_thr: float, min_pos_iou: float, low_quality: bool
) -> tuple[Tensor, Tensor]:
    """mmdet ``MaxIoUAssigner`` (``gt_max_assign_all=True``, no ignore boxes): ``(gt_inds, max_overlaps)`` per box,
    gt_inds 0 = negative, -1 = ignored, k = GT k-1.

    Negatives have max IoU in [0, neg_thr), positives >= pos_thr; with ``low_quality`` every box whose IoU equals
    a GT's best (when that best is >= ``min_pos_iou``) goes to that GT, later GTs overwriting earlier ones."""
    n = boxes.shape[0]
    if gt.shape[0] == 0 or n == 0:
        return boxes.new_zeros(n, dtype=torch.long), boxes.new_zeros(n)
    overlaps = box_iou_mm(gt, boxes)  # (G, N), as mmdet orders it
    max_overlaps, argmax = overlaps.max(dim=0)
    gt_inds = torch.full((n,), -1, dtype=torch.long, device=boxes.device)
    gt_inds[(max_overlaps >= 0) & (max_overlaps < neg_thr)] = 0
    pos = max_overlaps >= pos_thr
    gt_inds[pos] = argmax[pos] + 1
    if low_quality:
        gt_max = overlaps.max(dim=1).values
        for i in range(gt.shape[0]):  # sequential on purpose: a later GT overwrites an earlier one
            if gt_max[i] >= min_pos_iou:
                gt_inds[overlaps[i] == gt_max[i]] = i + 1
    return gt_inds, max_overlaps


def sample_pos_neg(gt_inds: Tensor, num: int, pos_fraction: float, choice: RandomChoice, name: str):
    """mmdet ``RandomSampler``: at most ``int(num * pos_fraction)`` positives, negatives filling ``num``; each pool
    drawn from only when larger than its quota. Returns sorted-unique ``(pos, neg)`` indices."""
    pos = torch.nonzero(gt_inds > 0).squeeze(1).unique()
    quota = int(num * pos_fraction)
    if pos.numel() > quota:
        pos = choice(name, pos, quota).unique()
    neg = torch.nonzero(gt_inds == 0).squeeze(1).unique()
    n_neg = num - pos.numel()
    if neg.numel() > n_neg:
        neg = choice(name, neg, n_neg).unique()
    return pos, neg
