"""Detection through the shared loop: train, checkpoint, evaluate (COCO JSON + COCOeval), DDP."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from adapterctl.cli import app
from adapterctl.config import compose
from adapterctl.engine import checkpoint as ckpt
from adapterctl.engine.train import run_train

from .conftest import tiny_det_overrides, torchrun_train

runner = CliRunner()
KEYS = [f"{k}_{s}" for k in ("bbox", "segm") for s in ("AP", "AP50", "AP75", "APs", "APm", "APl")]


def test_detection_trains_evaluates_and_writes_results_json(synth_det, tmp_path):
    out = tmp_path / "run"
    metrics = run_train(compose("train", tiny_det_overrides(synth_det, out)))
    assert set(KEYS) <= set(metrics)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["step"] == 3 and set(KEYS) <= set(saved)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "train/loss_mask" in r]
    assert len(losses) == 3 and all(r["train/loss_objectness"] > 0 for r in losses)
    results = json.loads((out / "results.json").read_text())
    assert isinstance(results, list)
    for r in results:
        assert r["category_id"] in (1, 3, 7, 12) and len(r["bbox"]) == 4 and "counts" in r["segmentation"]
    state = ckpt.load_checkpoint(out / "checkpoints" / "final.pt")
    assert state["config"]["task"] == "detection"

    evaluated = tmp_path / "eval"
    result = runner.invoke(
        app, ["eval", f"ckpt={out / 'checkpoints' / 'final.pt'}", f"paths.output_dir={evaluated}", "trainer.device=cpu"]
    )
    assert result.exit_code == 0, result.output
    again = json.loads((evaluated / "metrics.json").read_text())
    for k in KEYS:
        assert again[k] == saved[k], k  # the checkpoint alone reproduces the run's evaluation


def test_step_schedule_matches_mmcv():
    from adapterctl.engine.optim import step_warmup_factor

    assert step_warmup_factor(0, [8, 11], warmup_iters=500, warmup_ratio=0.001) == pytest.approx(0.001)
    assert step_warmup_factor(250, [1000], warmup_iters=500, warmup_ratio=0.001) == pytest.approx(0.5005)
    assert step_warmup_factor(1000, [1000, 2000]) == pytest.approx(0.1)
    assert step_warmup_factor(2500, [1000, 2000]) == pytest.approx(0.01)


def test_detection_needs_the_detection_head(tmp_path):
    result = runner.invoke(app, ["train", "task=detection", f"paths.output_dir={tmp_path}"])
    assert result.exit_code == 2 and "task=detection needs head=maskrcnn" in result.output


def test_torchrun_two_processes_detection(synth_det, tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun_train(tiny_det_overrides(synth_det, out, max_iters=2, batch_size=1))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = json.loads((out / "metrics.json").read_text())
    # 4 validation images over 2 ranks, gathered on rank 0: the same numbers as one process on the checkpoint
    single = tmp_path / "single"
    result = runner.invoke(
        app, ["eval", f"ckpt={out / 'checkpoints' / 'final.pt'}", f"paths.output_dir={single}", "trainer.device=cpu"]
    )
    assert result.exit_code == 0, result.output
    one = json.loads((single / "metrics.json").read_text())
    for k in KEYS:
        assert one[k] == ddp[k], k


def test_predict_writes_detections_and_export_refuses_clearly(synth_det, tmp_path):
    from PIL import Image

    out = tmp_path / "run"
    run_train(compose("train", tiny_det_overrides(synth_det, out, max_iters=1)))
    final = out / "checkpoints" / "final.pt"
    result = runner.invoke(
        app,
        [
            "predict",
            str(final),
            str(synth_det / "val"),
            "--out",
            str(tmp_path / "pred"),
            "--score-thr",
            "0.0",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    images = sorted((synth_det / "val").glob("*.jpg"))
    for img in images:
        rows = json.loads((tmp_path / "pred" / f"{img.stem}.json").read_text())
        assert rows["size"] == list(reversed(Image.open(img).size))
        for r in rows["detections"]:  # the COCO results format of results.json, plus the class name
            assert r["name"] in ("disc", "square", "triangle", "ring") and len(r["bbox"]) == 4
            assert r["category_id"] in (1, 3, 7, 12) and r["bbox"][2] >= 0 and r["bbox"][3] >= 0
            assert r["segmentation"]["size"] == rows["size"]
        assert (tmp_path / "pred" / f"{img.stem}_overlay.jpg").is_file()
    result = runner.invoke(app, ["export", f"ckpt={final}", "format=torchscript", f"paths.output_dir={tmp_path}"])
    assert result.exit_code == 1 and "export detection to onnx or torch_export" in result.output
    assert not list(tmp_path.glob("*.ts"))


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        ("maskrcnn", "onnx"),
        # HTC's export runs the cascade's stages too; the Cascade one alone is in the full suite (40-70 s each)
        pytest.param("cascade_maskrcnn", "torch_export", marks=pytest.mark.slow),
        ("htc", "torch_export"),
    ],
)
def test_detection_export_matches_eager_on_a_sample_image(synth_det, tmp_path, head, fmt):
    """``adapterctl export`` of a detector: boxes, scores, labels, masks at a fixed input size; the exported
    graph (onnxruntime / torch.export) finds the eager detections on a real image, box and score gaps stated."""
    out = tmp_path / "run"
    if head == "htc":
        overrides = _htc_overrides(synth_det, out, max_iters=1) + ["head.max_per_img=20"]
    elif head == "cascade_maskrcnn":
        overrides = _cascade_overrides(synth_det, out, max_iters=1)
    else:
        overrides = tiny_det_overrides(synth_det, out, max_iters=1)
    run_train(compose("train", overrides))
    image = sorted((synth_det / "val").glob("*.jpg"))[0]
    result = runner.invoke(
        app,
        ["export", f"ckpt={out / 'checkpoints' / 'final.pt'}", f"format={fmt}", "input_size=[128,160]",
         f"image={image}", f"paths.output_dir={tmp_path}"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "outputs boxes, scores, labels, masks" in result.output and "labels identical" in result.output
    n = int(result.output.split("parity with eager: ")[1].split(" detections")[0])
    assert n > 0  # the check compared real detections


def _cascade_overrides(data_root, out, **trainer):
    drop = ("head=", "head.representation")
    overrides = [o for o in tiny_det_overrides(data_root, out, **trainer) if not o.startswith(drop)]
    return overrides + ["head=cascade_maskrcnn", "head.conv_channels=16", "head.fc_channels=64",
                        "head.box_batch_size_per_image=64"]  # fmt: skip


def _htc_overrides(data_root, out, **trainer):
    drop = ("head=", "head.representation", "head.mask_channels")
    overrides = [o for o in tiny_det_overrides(data_root, out, **trainer) if not o.startswith(drop)]
    return overrides + [
        "head=htc", "head.conv_channels=16", "head.fc_channels=64", "head.box_batch_size_per_image=64",
        "head.semantic_classes=5", "head.extra_attention_heads=2", "data.train.pipeline=range",
        "data.train.scales=[[256,96],[256,160]]",
    ]  # fmt: skip


def _train_eval_predict(overrides, synth_det, tmp_path) -> list[dict]:
    """Train (3 iterations), then ``eval`` the final checkpoint alone (same metrics) and ``predict`` with it;
    returns the logged training rows."""
    out = tmp_path / "run"
    metrics = run_train(compose("train", overrides))
    assert set(KEYS) <= set(metrics)
    ckpt_path = out / "checkpoints" / "final.pt"
    evaluated = tmp_path / "eval"
    result = runner.invoke(app, ["eval", f"ckpt={ckpt_path}", f"paths.output_dir={evaluated}", "trainer.device=cpu"])
    assert result.exit_code == 0, result.output
    again = json.loads((evaluated / "metrics.json").read_text())
    assert all(again[k] == metrics[k] for k in KEYS)
    pred = tmp_path / "pred"
    image = sorted((synth_det / "val").glob("*"))[0]
    result = runner.invoke(app, ["predict", str(ckpt_path), str(image), "--out", str(pred)])
    assert result.exit_code == 0, result.output
    assert any(pred.iterdir())
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cascade_trains_evaluates_and_predicts_from_its_checkpoint(synth_det, tmp_path):
    """head=cascade_maskrcnn through the shared loop: stage losses logged, COCO metrics, and the checkpoint alone
    reproduces them in ``eval`` and serves ``predict``."""
    rows = _train_eval_predict(_cascade_overrides(synth_det, tmp_path / "run"), synth_det, tmp_path)
    losses = [r for r in rows if "train/loss_mask.s2" in r]
    assert len(losses) == 3 and all(r["train/loss_bbox.s0"] > 0 and 0 <= r["train/acc.s1"] <= 100 for r in losses)
    ckpt_path = tmp_path / "run" / "checkpoints" / "final.pt"
    result = runner.invoke(app, ["eval", f"ckpt={ckpt_path}", "trainer.device=cpu", "mode=aug"])
    assert result.exit_code == 2 and "HTC++" in result.output and "head=cascade_maskrcnn" in result.output
    assert "Traceback" not in result.output


def test_htc_trains_on_stuff_maps_evaluates_and_predicts(synth_det, tmp_path):
    """head=htc through the shared loop: the semantic branch learns from the synthetic stuff maps (resized and
    flipped with the image), stage losses logged, and the checkpoint alone reproduces the metrics and predicts."""
    rows = _train_eval_predict(_htc_overrides(synth_det, tmp_path / "run"), synth_det, tmp_path)
    losses = [r for r in rows if "train/loss_semantic_seg" in r]
    assert len(losses) == 3 and all(r["train/loss_semantic_seg"] > 0 and r["train/loss_mask.s2"] > 0 for r in losses)
    # the _ms protocol (mode=aug) from the checkpoint: two scales + flips with size ranges, eval and predict
    ckpt_path = tmp_path / "run" / "checkpoints" / "final.pt"
    aug = ["data.test.aug_scales=[[256,96],[512,256]]", "data.test.aug_scale_ranges=[[l],[s,m]]"]
    evaluated = tmp_path / "eval_aug"
    args = ["eval", f"ckpt={ckpt_path}", f"paths.output_dir={evaluated}", "trainer.device=cpu", "mode=aug", *aug]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert set(KEYS) <= set(metrics) and metrics["bbox_AP"] is not None and metrics["segm_AP"] is not None
    results = json.loads((evaluated / "results.json").read_text())
    per_image = Counter(r["image_id"] for r in results)
    assert results and max(per_image.values()) <= 1000
    pred = tmp_path / "pred_aug"
    image = sorted((synth_det / "val").glob("*"))[0]
    result = runner.invoke(app, ["predict", str(ckpt_path), str(image), "--out", str(pred), "--mode", "aug", *aug])
    assert result.exit_code == 0, result.output
    assert (pred / f"{image.stem}.json").is_file()
    # a wrong size-range list is one line naming the key, before any image is read
    bad = ["eval", f"ckpt={ckpt_path}", "trainer.device=cpu", "mode=aug", aug[0], "data.test.aug_scale_ranges=[[l]]"]
    result = runner.invoke(app, bad)
    assert result.exit_code == 2 and "data.test.aug_scale_ranges" in result.output
    assert "Traceback" not in result.output


def test_htc_without_stuff_maps_stops_at_start_naming_the_key(synth_det, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", *_htc_overrides(synth_det, out), "data.train.semantic_dir=null"])
    assert result.exit_code == 2, result.output
    assert "data.train.semantic_dir" in result.output and "Traceback" not in result.output
    assert not (out / "config.yaml").exists()
    missing = tmp_path / "stuff"
    missing.mkdir()
    result = runner.invoke(app, ["train", *_htc_overrides(synth_det, out), f"data.train.semantic_dir={missing}"])
    assert result.exit_code != 0 and "has no label map" in result.output and "synth_train_00000" in result.output
