"""COCO box and mask AP: results as COCO JSON (kept in the run directory), scored by pycocotools' COCOeval.

Results hold boxes as xywh in original pixels, masks as RLE and the original category ids, so the written file
is usable as a test-dev submission. Under DDP every rank's results are gathered on rank 0; each image is
evaluated by exactly one rank.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from adapterctl.data.coco import LabelMap

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


MMDET_MAX_DETS = (100, 300, 1000)  # mmdet 2.x CocoDataset.evaluate's proposal_nums, set as COCOeval's maxDets


class CocoEvaluator:
    """``max_dets``: COCOeval's ``params.maxDets``. mmdet (the official numbers) sets (100, 300, 1000), so AP
    stays at 100 detections per image while AP50 / AP75 / APs / APm / APl count up to 1000 (pycocotools reads
    ``maxDets[2]`` for them); with at most 100 detections per image it equals pycocotools' (1, 10, 100). It
    matters for HTC++'s multi-scale test (1000 detections) and the 300 of the AugReg HTC++ row."""

    def __init__(
        self, coco_gt, labels: LabelMap, iou_types: tuple[str, ...] = ("bbox", "segm"),
        max_dets: tuple[int, int, int] = MMDET_MAX_DETS,
    ) -> None:  # fmt: skip
        self.coco_gt = coco_gt
        self.labels = labels
        self.iou_types = iou_types
        self.max_dets = [int(m) for m in max_dets]
        self.results: list[dict] = []

    def reset(self) -> None:
        self.results = []

    def update(
        self,
        image_id: int,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor | None = None,
    ) -> None:
        """boxes: (N, 4) xyxy in original pixels; masks: (N, H, W) binary at the original size, or None."""
        from pycocotools import mask as mask_utils

        boxes = boxes.detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        rles = None
        if masks is not None and "segm" in self.iou_types:
            arr = np.asfortranarray(masks.detach().cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
            rles = mask_utils.encode(arr) if len(xywh) else []
        for i, (box, score, label) in enumerate(zip(xywh, scores.tolist(), labels.tolist(), strict=True)):
            row = {
                "image_id": int(image_id),
                "category_id": self.labels.to_cat(int(label)),
                "bbox": [round(v, 3) for v in box],
                "score": round(float(score), 5),
            }
            if rles is not None:
                rle = rles[i]
                row["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            self.results.append(row)

    def _gather(self) -> list[dict]:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.results
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.results)
        return [r for part in parts for r in part]

    def compute(self, results_file: str | Path | None = None) -> dict[str, float | None]:
        """``bbox_AP`` ... ``segm_APl`` in percent (rank 0; other ranks get an empty dict)."""
        import torch.distributed as dist
        from pycocotools.cocoeval import COCOeval

        results = self._gather()
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return {}
        if results_file is not None:
            from adapterctl.files import write_text

            write_text(results_file, json.dumps(results))
        metrics: dict[str, float | None] = {}
        for iou_type in self.iou_types:
            rows = [r for r in results if iou_type == "bbox" or "segmentation" in r]
            if not rows:
                metrics.update({f"{iou_type}_{s}": 0.0 for s in STAT_NAMES})
                continue
            with contextlib.redirect_stdout(io.StringIO()):
                dt = self.coco_gt.loadRes(rows)
                ev = COCOeval(self.coco_gt, dt, iou_type)
                ev.params.maxDets = list(self.max_dets)
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            # COCOeval reports -1 where a size range has no ground truth: undefined, not 0
            metrics.update(
                {
                    f"{iou_type}_{s}": None if v < 0 else round(100.0 * float(v), 4)
                    for s, v in zip(STAT_NAMES, ev.stats[:6], strict=True)
                }
            )
        return metrics
