"""mIoU / mAcc / aAcc against a hand-written numpy version of mmseg's computation."""

from __future__ import annotations

import numpy as np
import torch

from adapterctl.engine.evaluators import SegEvaluator


def _numpy_reference(preds, labels, num_classes, ignore=255):
    inter = np.zeros(num_classes)
    area_pred = np.zeros(num_classes)
    area_label = np.zeros(num_classes)
    for p, lab in zip(preds, labels, strict=True):
        mask = lab != ignore
        p, lab = p[mask], lab[mask]
        hit = p[p == lab]
        inter += np.bincount(hit, minlength=num_classes)
        area_pred += np.bincount(p, minlength=num_classes)
        area_label += np.bincount(lab, minlength=num_classes)
    union = area_pred + area_label - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
        acc = inter / area_label
    return 100 * np.nanmean(iou), 100 * np.nanmean(acc), 100 * inter.sum() / area_label.sum(), iou


def test_metric_equals_numpy_reference_with_ignored_pixels_and_absent_classes():
    rng = np.random.default_rng(0)
    k = 6
    preds, labels = [], []
    for shape in ((20, 30), (17, 9), (32, 32)):
        lab = rng.integers(0, 4, size=shape)  # classes 4 and 5 never appear in the labels
        lab[rng.random(shape) < 0.2] = 255
        pred = np.where(rng.random(shape) < 0.6, lab, rng.integers(0, 5, size=shape))  # class 5 never predicted
        pred[pred == 255] = 0
        preds.append(pred)
        labels.append(lab)
    ev = SegEvaluator(k)
    for p, lab in zip(preds, labels, strict=True):
        ev.update(torch.from_numpy(p), torch.from_numpy(lab))
    got = ev.compute()
    miou, macc, aacc, iou = _numpy_reference(preds, labels, k)
    assert abs(got["mIoU"] - miou) < 1e-3 and abs(got["mAcc"] - macc) < 1e-3 and abs(got["aAcc"] - aacc) < 1e-3
    assert got["per_class"]["5"]["IoU"] is None  # zero union: excluded from the mean
    assert got["per_class"]["4"]["IoU"] == 0.0  # predicted but absent: IoU 0, counted
    assert got["per_class"]["4"]["Acc"] is None
    assert abs(got["per_class"]["0"]["IoU"] - 100 * iou[0]) < 1e-3
