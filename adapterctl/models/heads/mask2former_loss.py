"""Mask2Former training targets, Hungarian matching and point-sampled losses (mmdet 2.22 semantics).

Per prediction l (all ``dec_layers + 1`` of them) and image b: ``P`` random points shared by all queries and
GT masks, cost = 2 * (-softmax[:, gt]) + 5 * BCE cost + 5 * dice cost (eps 1), ``linear_sum_assignment``.
Losses on the matched masks at ``P`` points per mask chosen by uncertainty (``int(3P)`` candidates, the
``int(0.75P)`` most uncertain, the rest uniform): class CE with no-object weight 0.1 (weighted mean), mask
BCE over all points of all masks, naive dice with eps 1, both divided by the matched-mask count averaged over
ranks. Random draws go through a :class:`PointSampler`, so tests can replay stored points.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def point_sample(x: Tensor, points: Tensor) -> Tensor:
    """(N, C, H, W) sampled at (N, P, 2) normalised (x, y) points -> (N, C, P); bilinear, zero padding."""
    return F.grid_sample(x, 2.0 * points.unsqueeze(2) - 1.0, mode="bilinear", align_corners=False).squeeze(3)


class PointSampler:
    """The random points of matching and losses, drawn with ``torch.rand`` exactly as the official head does
    (same shapes, same order), from ``generator`` (default: the global generator)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def _rand(self, *shape: int, device) -> Tensor:
        gen = self.generator
        if gen is not None and gen.device != torch.device(device):
            return torch.rand(*shape, generator=gen, device=gen.device).to(device)
        return torch.rand(*shape, generator=gen, device=device)

    def match_points(self, layer: int, image: int, num_points: int, device) -> Tensor:
        """(P, 2) points shared by all queries and GT masks of one image."""
        return self._rand(1, num_points, 2, device=device)[0]

    def loss_points(
        self, layer: int, mask_logits: Tensor, num_points: int, oversample_ratio: float, importance_ratio: float
    ) -> Tensor:
        """(N, P, 2) points per matched mask: the most uncertain of ``int(P * oversample)`` candidates (by
        ``-|logit|`` at the candidates), then uniform ones."""
        n = mask_logits.shape[0]
        num_sampled = int(num_points * oversample_ratio)
        num_uncertain = int(importance_ratio * num_points)
        cand = self._rand(n, num_sampled, 2, device=mask_logits.device)
        uncertainty = -point_sample(mask_logits, cand)[:, 0].abs()
        idx = uncertainty.topk(num_uncertain, dim=1)[1]
        chosen = torch.gather(cand, 1, idx[..., None].expand(-1, -1, 2))
        if num_points - num_uncertain > 0:
            chosen = torch.cat((chosen, self._rand(n, num_points - num_uncertain, 2, device=mask_logits.device)), 1)
        return chosen


class ReplayPoints(PointSampler):
    """Stored points: ``match[l][b]`` (P, 2) and ``loss[l]`` (N_l, P, 2) (the official fixtures' layout)."""

    def __init__(self, match: Tensor | list, loss: list[Tensor]) -> None:
        super().__init__()
        self.match, self.loss = match, loss

    def match_points(self, layer, image, num_points, device):
        return self.match[layer][image].to(device)

    def loss_points(self, layer, mask_logits, num_points, oversample_ratio, importance_ratio):
        return self.loss[layer].to(mask_logits.device)


def to_mask(labels: Tensor, ignore_index: int = 255) -> tuple[list[Tensor], list[Tensor]]:
    """ViT-Adapter's ToMask on (B, H, W) label maps: per image the present classes ascending (``ignore_index``
    dropped) and one binary mask each; ignored pixels belong to no mask."""
    gt_labels, gt_masks = [], []
    for seg in labels:
        classes = torch.unique(seg)
        classes = classes[classes != ignore_index]
        gt_labels.append(classes.long())
        gt_masks.append(seg.unsqueeze(0) == classes.view(-1, 1, 1))
    return gt_labels, gt_masks


@dataclass
class MatchCosts:
    cls: Tensor
    mask: Tensor
    dice: Tensor

    @property
    def total(self) -> Tensor:
        return self.cls + self.mask + self.dice


def matching_costs(
    cls_logits: Tensor, mask_points: Tensor, gt_labels: Tensor, gt_points: Tensor,
    cls_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
) -> MatchCosts:  # fmt: skip
    """(Q, n) weighted costs from (Q, K+1) logits, (Q, P) mask logits and (n, P) GT values at the same points."""
    cost_cls = -cls_logits.softmax(-1)[:, gt_labels] * cls_weight
    pred = mask_points.float()
    gt = gt_points.float()
    pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
    neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
    cost_mask = (torch.einsum("nc,mc->nm", pos, gt) + torch.einsum("nc,mc->nm", neg, 1 - gt)) / pred.shape[1]
    prob = pred.sigmoid()
    numerator = 2 * torch.einsum("nc,mc->nm", prob, gt)
    denominator = prob.sum(-1)[:, None] + gt.sum(-1)[None, :]
    cost_dice = 1 - (numerator + 1.0) / (denominator + 1.0)
    return MatchCosts(cost_cls, cost_mask * mask_weight, cost_dice * dice_weight)


def hungarian(cost: Tensor) -> tuple[Tensor, Tensor]:
    """``linear_sum_assignment`` on a sanitised copy (NaN -> a large cost, +-inf clamped), so a diverging run
    reaches the loss's finite check instead of a solver error. Returns (query indices ascending, GT indices)."""
    c = cost.detach().float().cpu()
    c = torch.nan_to_num(c, nan=1e8, posinf=1e8, neginf=-1e8).numpy()
    rows, cols = linear_sum_assignment(c)
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols.astype(np.int64), dtype=torch.long)


def _mean_over_ranks(x: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


def mask2former_losses(
    head, outputs: dict, gt_labels: list[Tensor], gt_masks: list[Tensor], points: PointSampler | None = None,
    record: dict | None = None,
) -> dict[str, Tensor]:  # fmt: skip
    """The loss dict of all predictions: ``loss_cls``, ``loss_mask``, ``loss_dice`` for the last one and
    ``loss_cls.d{l}`` ... for the auxiliary ones (official names ``d{l}.loss_cls``). ``record``, if given,
    receives the matching per prediction (``query_inds``, ``gt_inds``, ``costs``, ``num_total_masks``) and
    the seconds spent on costs and assignment (``matching_s``)."""
    points = points if points is not None else PointSampler()
    all_cls, all_masks = outputs["cls"].float(), outputs["masks"].float()
    with torch.autocast(all_cls.device.type, enabled=False):
        return _losses(head, all_cls, all_masks, gt_labels, gt_masks, points, record)


def _losses(head, all_cls, all_masks, gt_labels, gt_masks, points, record) -> dict[str, Tensor]:
    num_preds, b, q = all_cls.shape[:3]
    num_classes = head.num_classes
    out: dict[str, Tensor] = {}
    for lvl in range(num_preds):
        cls, masks = all_cls[lvl], all_masks[lvl]
        labels = torch.full((b, q), num_classes, dtype=torch.long, device=cls.device)
        pred_rows, target_masks, matched = [], [], []
        for i in range(b):
            pts = points.match_points(lvl, i, head.num_points, masks.device).to(masks.dtype)
            n = gt_labels[i].numel()
            if n == 0:  # nothing to match (the points are still drawn, as the official head does)
                empty = torch.zeros(0, dtype=torch.long)
                matched.append((empty, empty, None))
                pred_rows.append(masks[i][:0])
                target_masks.append(gt_masks[i][:0])
                continue
            pred_pts = point_sample(masks[i].unsqueeze(1), pts.expand(q, -1, -1)).squeeze(1)
            gt_pts = point_sample(gt_masks[i].unsqueeze(1).to(masks.dtype), pts.expand(n, -1, -1)).squeeze(1)
            tic = time.perf_counter()
            costs = matching_costs(
                cls[i], pred_pts, gt_labels[i], gt_pts, head.cls_weight, head.mask_weight, head.dice_weight
            )
            rows, cols = hungarian(costs.total)
            if record is not None:
                record["matching_s"] = record.get("matching_s", 0.0) + time.perf_counter() - tic
            matched.append((rows, cols, costs))
            rows_d, cols_d = rows.to(cls.device), cols.to(cls.device)
            labels[i, rows_d] = gt_labels[i][cols_d]
            pred_rows.append(masks[i][rows_d])
            target_masks.append(gt_masks[i][cols_d])
        num_matched = sum(int(r.numel()) for r, _, _ in matched)
        num_total = _mean_over_ranks(cls.new_tensor([float(num_matched)])).clamp(min=1.0)
        if record is not None:
            record.setdefault("query_inds", []).append([r for r, _, _ in matched])
            record.setdefault("gt_inds", []).append([c for _, c, _ in matched])
            record.setdefault("costs", []).append([c for _, _, c in matched])
            record.setdefault("class_targets", []).append(labels)
            record.setdefault("num_total_masks", []).append(num_total)
        weight = head.class_weight.to(cls.dtype)
        ce = F.cross_entropy(cls.flatten(0, 1).float(), labels.flatten(), weight=weight.float(), reduction="none")
        loss_cls = head.cls_weight * ce.sum() / weight[labels.flatten()].sum()
        mask_preds = torch.cat(pred_rows)
        if mask_preds.shape[0] == 0:  # no GT in the whole batch: zero losses that keep the graph
            loss_mask = loss_dice = all_masks[lvl].sum() * 0.0
        else:
            targets = torch.cat(target_masks).unsqueeze(1).to(mask_preds.dtype)
            with torch.no_grad():
                pts = points.loss_points(
                    lvl, mask_preds.unsqueeze(1).detach(), head.num_points, head.oversample_ratio,
                    head.importance_sample_ratio,
                ).to(mask_preds.dtype)  # fmt: skip
                target_pts = point_sample(targets, pts).squeeze(1)
            pred_pts = point_sample(mask_preds.unsqueeze(1), pts).squeeze(1).float()
            target_pts = target_pts.float()
            prob = pred_pts.sigmoid()
            dice = 1 - (2 * (prob * target_pts).sum(1) + 1.0) / (prob.sum(1) + target_pts.sum(1) + 1.0)
            loss_dice = head.dice_weight * dice.sum() / num_total
            bce = F.binary_cross_entropy_with_logits(pred_pts, target_pts, reduction="sum")
            loss_mask = head.mask_weight * bce / (num_total * head.num_points)
        suffix = "" if lvl == num_preds - 1 else f".d{lvl}"
        out[f"loss_cls{suffix}"] = loss_cls
        out[f"loss_mask{suffix}"] = loss_mask.reshape(())
        out[f"loss_dice{suffix}"] = loss_dice.reshape(())
    return out
