"""What differs between tasks for the one training loop: datasets, how a batch enters the model, evaluation.

The loop itself (``engine/train.py``) is shared: ``loss_dict = model(*task.inputs(batch))``, sum the ``loss_*``
terms, backward, step.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from adapterctl.engine.precision import autocast_context
from adapterctl.errors import ConfigError, TrainingError
from adapterctl.registry import Registry

log = logging.getLogger(__name__)


class SegmentationTask:
    name = "segmentation"
    headline = ("mIoU", "mAcc", "aAcc")

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def check(self, dist) -> None:
        """What the config must satisfy for this task, checked before the model is built."""
        from adapterctl.data.loader import class_names

        names = class_names(self.cfg.data)  # a names list or classes.txt that disagrees with num_classes is an error
        if not self.cfg.data.get("classes") and (Path(str(self.cfg.data.root)) / "classes.txt").is_file():
            self.cfg.data.classes = names  # recorded in the run's config: the checkpoint names its classes
        synced = dist.distributed and dist.device.type == "cuda"
        if int(self.cfg.trainer.batch_size) * (dist.world_size if synced else 1) < 2:
            raise TrainingError(
                f"trainer.batch_size={self.cfg.trainer.batch_size}: BatchNorm after UperNet's 1x1 pyramid pooling "
                "needs at least 2 images per normalisation group (per process, or across GPUs with SyncBatchNorm)"
            )

    def dataset(self, train: bool):
        from adapterctl.data.loader import build_seg_dataset

        return build_seg_dataset(self.cfg.data, train=train)

    @staticmethod
    def collate_train(batch):
        from adapterctl.data.ade20k import collate_train

        return collate_train(batch)

    @staticmethod
    def inputs(batch: dict, device: torch.device) -> tuple:
        return batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)

    def evaluate(
        self,
        model: nn.Module,
        val_set,
        device: torch.device,
        amp: str,
        num_workers: int,
        rank: int,
        world: int,
        out_dir: Path | None = None,
        mode: str | None = None,
        save_predictions: bool = False,
    ) -> dict:
        from adapterctl.data.loader import class_names, eval_loader
        from adapterctl.engine.evaluators import SegEvaluator, evaluate_segmentation

        data = self.cfg.data
        evaluator = SegEvaluator(int(data.num_classes), class_names(data), int(data.ignore_index), device)
        pred_dir = out_dir / "predictions" if (save_predictions and out_dir is not None) else None
        return evaluate_segmentation(
            model,
            eval_loader(val_set, num_workers, rank, world),
            evaluator,
            device,
            amp,
            mode=mode,
            predictions_dir=pred_dir,
            reduce_zero_label=bool(data.reduce_zero_label),
        )

    def predict(self, model: nn.Module, images, out_dir: Path, device, *, mode=None, score_thr=0.5, alpha=0.5):
        """``adapterctl predict``: label PNGs and overlays (``adapterctl.predict.predict_segmentation``)."""
        from adapterctl.predict import predict_segmentation

        return predict_segmentation(model, self.cfg, images, out_dir, device, mode, alpha)

    @staticmethod
    def table(metrics: dict, title: str):
        from adapterctl.engine.evaluators import metrics_table

        return metrics_table(metrics, title)


class DetectionTask:
    name = "detection"
    headline = ("bbox_AP", "bbox_AP50", "segm_AP")

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def check(self, dist) -> None:  # noqa: ARG002 - the COCO checks run when the datasets open
        return None

    def dataset(self, train: bool):
        from adapterctl.data.coco import build_det_dataset

        data = self.cfg.data
        semantic = bool(self.cfg.head.get("semantic_labels", False))  # a head with a semantic branch (HTC++)
        if train and semantic and not data.train.get("semantic_dir"):
            raise ConfigError(
                f"head={self.cfg.head.name} trains a semantic branch on COCO stuff maps: set data.train.semantic_dir "
                "(the stuffthingmaps/train2017 folder; datasets/README.md, 'COCO stuff maps')"
            )
        dataset = build_det_dataset(data, train=train, semantic=semantic)
        if train and data.get("category_ids") is None:  # the run's config (and checkpoints) name the classes
            data.classes = list(data.classes) if data.get("classes") else dataset.labels.names
            data.category_ids = dataset.labels.cat_ids
        return dataset

    @staticmethod
    def collate_train(batch):
        return {"samples": list(batch), "skipped": []}

    @staticmethod
    def inputs(batch: dict, device: torch.device) -> tuple:
        images = [s["image"].to(device) for s in batch["samples"]]
        targets = [
            {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in s["target"].items()} for s in batch["samples"]
        ]
        return images, targets

    def evaluate(
        self,
        model: nn.Module,
        val_set,
        device: torch.device,
        amp: str,
        num_workers: int,
        rank: int,
        world: int,
        out_dir: Path | None = None,
        mode: str | None = None,
        save_predictions: bool = False,
    ) -> dict:
        from adapterctl.data.loader import eval_loader
        from adapterctl.engine.coco_eval import CocoEvaluator

        mode = self.test_mode(mode, model)
        if mode == "aug":  # the views are made from the unresized image
            val_set = copy.copy(val_set)
            val_set.transform = None
        loader = eval_loader(val_set, num_workers, rank, world, collate_fn=list)
        evaluator = CocoEvaluator(val_set.coco, val_set.labels)
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            for batch in loader:
                for s in batch:
                    with autocast_context(device, amp):
                        det = self.detect(model, s["image"].to(device), s["ori_size"], mode)
                    evaluator.update(
                        s["target"]["image_id"],
                        det["boxes"].float(),
                        det["scores"].float(),
                        det["labels"],
                        det["masks"][:, 0] if "masks" in det else None,
                    )
        model.train(was_training)
        results_file = out_dir / "results.json" if out_dir is not None else None
        return evaluator.compute(results_file)

    def test_mode(self, mode: str | None, model: nn.Module | None = None) -> str:
        """``mode`` (or ``data.test.mode``): ``whole`` (one view at ``data.test.scales``) or ``aug`` (HTC++'s
        multi-scale + flip test over ``data.test.aug_scales``), checked against the config and the model."""
        from adapterctl.models.htc_aug import check_scale_ranges

        test = self.cfg.data.test
        mode = str(mode or test.get("mode") or "whole")
        if mode not in ("whole", "aug"):
            raise ConfigError(f"mode={mode}: a detection checkpoint is tested whole (one scale) or aug (multi-scale)")
        if mode == "whole":
            return mode
        head = str(self.cfg.head.get("name"))
        if head != "htc" or (model is not None and not hasattr(model, "aug_test")):
            raise ConfigError(
                f"mode=aug is HTC++'s multi-scale + flip test (the official _ms configs); head={head} has none"
            )
        if not test.get("aug_scales"):
            raise ConfigError(
                "mode=aug needs data.test.aug_scales (e.g. [[3000,600],[3000,800],...,[3000,1600]]) and, for the "
                "official _ms test, data.test.aug_scale_ranges ([[l],[l],[m,l],[s,m],[s,m],[s,m]])"
            )
        if test.get("aug_scale_ranges") is None:
            log.warning(
                "mode=aug with data.test.aug_scale_ranges=null: every view keeps boxes of all sizes (the official "
                "_ms configs keep [[l],[l],[m,l],[s,m],[s,m],[s,m]])"
            )
        try:
            check_scale_ranges(test.get("aug_scale_ranges"), len(test.aug_scales), "data.test.aug_scale_ranges")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return mode

    def detect(self, model: nn.Module, image: torch.Tensor, ori_size, mode: str) -> dict:
        """One image's detections in original pixels: ``image`` is resized by the test pipeline (whole) or the
        original (aug)."""
        if mode == "aug":
            test = self.cfg.data.test
            ranges = test.get("aug_scale_ranges")
            return model.aug_test(
                image, [list(s) for s in test.aug_scales], flip=bool(test.get("aug_flip", True)),
                scale_ranges=[list(r) for r in ranges] if ranges is not None else None,
                max_per_img=int(test.get("aug_max_per_img", 1000)),
            )  # fmt: skip
        return model([image], original_sizes=[ori_size])[0]

    def predict(self, model: nn.Module, images, out_dir: Path, device, *, mode=None, score_thr=0.5, alpha=0.5):
        """``adapterctl predict``: COCO-results JSON and overlays (``adapterctl.predict.predict_detection``)."""
        from adapterctl.predict import predict_detection

        mode = self.test_mode(mode, model)
        return predict_detection(model, self.cfg, images, out_dir, device, score_thr, alpha, task=self, mode=mode)

    @staticmethod
    def table(metrics: dict, title: str):
        from rich.table import Table

        table = Table(title=title)
        table.add_column("")
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            table.add_column(name, justify="right")
        for kind in ("bbox", "segm"):
            row = [metrics.get(f"{kind}_{n}") for n in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
            table.add_row(kind, *("-" if v is None else f"{v:.1f}" for v in row))
        return table


TASKS: Registry[type] = Registry("task", "task")
TASKS.register("segmentation", SegmentationTask)
TASKS.register("detection", DetectionTask)


def get_task(cfg: DictConfig):
    return TASKS.get(str(cfg.task))(cfg)


def headline(metrics: dict, keys: Sequence[str]) -> str:
    return " ".join(f"{k} {metrics.get(k)}" for k in keys)
