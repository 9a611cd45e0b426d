"""``adapterctl bench --model``: whole models from their experiment configs, on synthetic inputs."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from adapterctl.bench_models import PeakMemory, input_size, synthetic_batch
from adapterctl.cli import app
from adapterctl.config import compose
from adapterctl.engine.tasks import DetectionTask, SegmentationTask


def test_input_sizes_are_the_experiments_own():
    ade = compose("train", ["experiment=ade20k_upernet_vit_adapter_t"])
    coco = compose("train", ["experiment=coco_maskrcnn_vit_adapter_t_3x"])
    pascal = compose("train", ["experiment=pascal_context59_mask2former_beit_adapter_b_480"])
    assert input_size(ade, None) == (512, 512)  # the training crop
    assert input_size(pascal, None) == (480, 480)
    assert input_size(coco, None) == (800, 1067)  # a 640 x 480 image at the test scale 1333 x 800
    assert input_size(coco, 256) == (256, 256)


def test_peak_memory_is_the_tensor_memory_live_at_once():
    n = 1 << 20  # 4 MiB of float32
    with PeakMemory(torch.device("cpu")) as mem:
        a = torch.ones(n)
        b = a * 2  # 8 MiB live
        del a
        c = b + 1  # still 8 MiB: a was freed first
        del b, c
    assert mem.peak_mib == pytest.approx(8.0, rel=0.01)
    with PeakMemory(torch.device("cpu")) as none:
        pass
    assert none.peak_mib == 0


def test_synthetic_detection_batch_has_boxes_masks_and_the_stuff_map_htc_needs():
    cfg = compose("train", ["experiment=synthetic_htc_vit_adapter_t_demo"])
    images, targets = DetectionTask.inputs(synthetic_batch(cfg, 2, (64, 96)), torch.device("cpu"))
    assert len(images) == len(targets) == 2 and images[0].shape == (3, 64, 96)
    t = targets[0]
    boxes = t["boxes"]
    assert boxes.shape == (8, 4) and (boxes[:, 2:] > boxes[:, :2]).all()
    assert (boxes[:, [0, 2]] <= 96).all() and (boxes[:, [1, 3]] <= 64).all() and (boxes >= 0).all()
    assert t["masks"].shape == (8, 64, 96) and t["masks"].dtype == torch.uint8
    x0, y0, x1, y1 = boxes[0].long().tolist()
    assert t["masks"][0].sum() == (x1 - x0) * (y1 - y0)  # each mask fills its box
    assert t["labels"].min() >= 1 and t["labels"].max() <= int(cfg.data.num_classes)  # 0 is the background
    assert t["semantic"].shape == (64, 96)
    seg = compose("train", ["experiment=synthetic_upernet_vit_adapter_t_demo"])
    images, labels = SegmentationTask.inputs(synthetic_batch(seg, 3, (32, 32)), torch.device("cpu"))
    assert images.shape == (3, 3, 32, 32) and labels.shape == (3, 32, 32) and labels.max() < seg.data.num_classes


def test_bench_model_times_whole_models_of_both_tasks_and_writes_json(tmp_path):
    out = tmp_path / "models.json"
    args = ["bench", "--model", "synthetic_upernet_vit_adapter_t_demo", "--model",
            "synthetic_maskrcnn_vit_adapter_t_demo", "--model", "synthetic_mask2former_vit_adapter_t_demo",
            "--input", "64", "--batch", "2", "--runs", "1", "--warmup", "0", "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "whole models" in result.output and "GFLOPs" in result.output
    record = json.loads(out.read_text())
    assert record["benchmark"] == "models" and record["input"] == 64
    rows = {r["experiment"]: r for r in record["results"]["models"]}
    assert [r["task"] for r in rows.values()] == ["segmentation", "detection", "segmentation"]
    assert rows["synthetic_mask2former_vit_adapter_t_demo"]["head"] == "mask2former"
    for r in rows.values():
        assert r["input_hw"] == [64, 64] and r["batch"] == 2 and r["params_m"] > 1
        assert r["inference_gflops"] > 0 and r["train_peak_mib"] > r["inference_peak_mib"] > 0
        assert r["inference_images_per_s"] == pytest.approx(1 / r["inference_s"])
        assert r["train_images_per_s"] == pytest.approx(2 / r["train_step_s"])


def test_bench_model_refuses_bad_combinations_in_one_line():
    runner = CliRunner()
    for args, needle in (
        (["bench", "--batch", "2"], "with --model"),
        (["bench", "--model", "synthetic_upernet_vit_adapter_t_demo", "--train-step", "x"], "give one of"),
        (["bench", "--model", "synthetic_upernet_vit_adapter_t_demo", "--dtype", "both"], "one dtype"),
        (
            ["bench", "--model", "synthetic_upernet_vit_adapter_t_demo", "--model", "no_such_experiment"],
            "no_such_experiment",
        ),  # the second model's config is checked before the first is timed
        (["bench", "--model", "synthetic_upernet_vit_adapter_t_demo", "--batch", "1"], "at least 2 images"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output and "Traceback" not in result.output and "whole models" not in result.output
