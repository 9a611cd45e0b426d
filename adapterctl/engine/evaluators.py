"""Evaluators and the segmentation evaluation loop (a leaf module: the ``eval`` command, the training loop and
the tasks all use it; it uses none of them).

``SegEvaluator`` computes mmseg's mIoU / mAcc / aAcc: intersections and unions are summed over the whole set (a
confusion matrix), classes with zero union are left out of the mean, and the matrix is summed across ranks by
torchmetrics. Each rank evaluates a disjoint shard (no DistributedSampler padding), so every image counts once.
COCO's evaluator lives beside it in ``coco_eval.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adapterctl.engine.precision import autocast_context


class SegEvaluator:
    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        ignore_index: int = 255,
        device: torch.device | str = "cpu",
    ) -> None:
        from torchmetrics.classification import MulticlassConfusionMatrix

        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.confusion = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index).to(device)

    def reset(self) -> None:
        self.confusion.reset()

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """pred, label: integer maps of the same shape (label may hold ignore_index)."""
        self.confusion.update(pred.reshape(-1), label.reshape(-1))

    def compute(self) -> dict:
        """Percentages: ``mIoU``, ``mAcc``, ``aAcc`` and ``per_class`` {name: {IoU, Acc}} (None where undefined)."""
        cm = self.confusion.compute().double().cpu()  # rows: label, cols: prediction; synced across ranks
        inter = cm.diag()
        area_label, area_pred = cm.sum(1), cm.sum(0)
        union = area_label + area_pred - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
        acc = torch.where(area_label > 0, inter / area_label.clamp(min=1), torch.full_like(inter, float("nan")))
        total = cm.sum()
        result = {
            "mIoU": _pct(np.nanmean(iou.numpy()) if (~iou.isnan()).any() else float("nan")),
            "mAcc": _pct(np.nanmean(acc.numpy()) if (~acc.isnan()).any() else float("nan")),
            "aAcc": _pct(float(inter.sum() / total) if total > 0 else float("nan")),
            "per_class": {
                name: {"IoU": _pct(float(i)), "Acc": _pct(float(a))}
                for name, i, a in zip(self.class_names, iou, acc, strict=True)
            },
        }
        return result


def _pct(x: float) -> float | None:
    return None if math.isnan(x) else round(100.0 * float(x), 4)


@torch.inference_mode()
def evaluate_segmentation(
    model: nn.Module,
    batches: Iterable[list[dict]],
    evaluator: SegEvaluator,
    device: torch.device,
    amp: str = "none",
    mode: str | None = None,
    predictions_dir: Path | None = None,
    reduce_zero_label: bool = True,
) -> dict:
    """Predict each image at its original size and accumulate the metric; returns ``evaluator.compute()``."""
    from PIL import Image

    from adapterctl.data.loader import to_annotation_values
    from adapterctl.files import save_image

    was_training = model.training
    model.eval()
    evaluator.reset()
    for batch in batches:
        for sample in batch:
            image = sample["image"][None].to(device)
            with autocast_context(device, amp):
                scores = model.predict(image, out_size=sample["ori_size"], mode=mode)
            pred = scores.argmax(1)[0]
            evaluator.update(pred, sample["label"].to(device))
            if predictions_dir is not None:
                png = to_annotation_values(pred.cpu().numpy(), reduce_zero_label, evaluator.num_classes)
                save_image(Image.fromarray(png), predictions_dir / f"{Path(sample['path']).stem}.png")  # L or I;16
    model.train(was_training)
    return evaluator.compute()


def write_metrics(metrics: dict, path: Path) -> None:
    from adapterctl.files import write_text

    write_text(path, json.dumps(metrics, indent=2) + "\n")


def metrics_table(metrics: dict, title: str = "Segmentation"):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("class")
    table.add_column("IoU", justify="right")
    table.add_column("Acc", justify="right")

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for name, row in metrics["per_class"].items():
        table.add_row(name, fmt(row["IoU"]), fmt(row["Acc"]))
    table.add_section()
    table.add_row("[bold]mean[/]", f"[bold]{fmt(metrics['mIoU'])}[/]", f"[bold]{fmt(metrics['mAcc'])}[/]")
    table.add_row("aAcc", "", fmt(metrics["aAcc"]))
    return table
