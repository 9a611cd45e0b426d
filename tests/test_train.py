"""The training loop, checkpoints, resume and evaluation from a checkpoint alone, on the tiny synthetic set."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from adapterctl.cli import app
from adapterctl.config import compose
from adapterctl.engine import checkpoint as ckpt
from adapterctl.engine.optim import param_groups, poly_warmup_factor
from adapterctl.engine.train import TrainingError, run_train
from adapterctl.errors import ConfigError, Preempted

from .conftest import TINY_MODEL, tiny_train_overrides

runner = CliRunner()


def _train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_train_writes_run_directory_and_learns_something(synth_seg, tmp_path):
    out = tmp_path / "run"
    metrics = run_train(compose("train", tiny_train_overrides(synth_seg, out, max_iters=4, eval_interval=2)))
    assert yaml.safe_load((out / "config.yaml").read_text())["trainer"]["max_iters"] == 4
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["step"] == 4 and set(metrics) >= {"mIoU", "mAcc", "aAcc", "per_class"}
    assert metrics["mIoU"] is not None and 0 <= metrics["mIoU"] <= 100
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2, 4]
    assert (out / "checkpoints" / "final.pt").resolve().name == "iter_0000004.pt"
    state = ckpt.load_checkpoint(out / "checkpoints" / "iter_0000004.pt")
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "step", "config", "rng"}
    assert len(_train_losses(out)) == 4
    assert list((out / "tensorboard").iterdir())


def test_sigterm_checkpoints_and_resume_continues_the_same_loss_curve(synth_seg, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    run_train(compose("train", tiny_train_overrides(synth_seg, straight, max_iters=4, checkpoint_interval=100)))
    part = tmp_path / "part"
    # preemption: SIGTERM arrives during iteration 2; the loop finishes it, checkpoints and raises Preempted
    original_step = torch.optim.lr_scheduler.LambdaLR.step
    calls = {"n": 0}

    def step_then_signal(self, *a, **k):
        original_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:  # the constructor steps once; this is iteration 2
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step_then_signal)
    with pytest.raises(Preempted, match="preempted at iteration 2"):
        run_train(compose("train", tiny_train_overrides(synth_seg, part, max_iters=4, checkpoint_interval=100)))
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(part / "checkpoints")] == [2]
    run_train(compose("train", tiny_train_overrides(synth_seg, part, max_iters=4) + ["resume=true"]))
    a, b = _train_losses(straight), _train_losses(part)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert math.isclose(a[step], b[step], rel_tol=1e-5), (step, a[step], b[step])


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpts" / "iter_0000001.pt"
    ckpt.save_checkpoint({"step": 1, "model": {"w": torch.ones(3)}, "config": {}}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"step": 2, "model": {"w": torch.zeros(3)}, "config": {}}, path)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["iter_0000001.pt"]


def test_non_finite_loss_stops_with_a_clear_message(synth_seg, tmp_path, monkeypatch):
    import adapterctl.models.heads.common as heads

    real_ce, calls = heads.seg_cross_entropy, {"n": 0}

    def ce_nan_from_iteration_3(*args, **kwargs):  # two heads: calls 5 and 6 are iteration 3
        calls["n"] += 1
        loss = real_ce(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(heads, "seg_cross_entropy", ce_nan_from_iteration_3)
    cfg = compose("train", tiny_train_overrides(synth_seg, tmp_path / "nan", max_iters=6))
    with pytest.raises(TrainingError, match=r"non-finite loss at iteration 3 \(loss_decode=nan.*iter_0000002\.pt"):
        run_train(cfg)
    found = ckpt.list_checkpoints(tmp_path / "nan" / "checkpoints")
    assert [s for s, _ in found] == [2]  # the last good checkpoint stays, nothing later was written
    assert ckpt.load_checkpoint(found[0][1])["step"] == 2


def test_eval_from_checkpoint_alone_with_predictions(synth_seg, tmp_path):
    out = tmp_path / "run"
    run_train(compose("train", tiny_train_overrides(synth_seg, out, max_iters=2)))
    eval_dir = tmp_path / "eval"
    result = runner.invoke(
        app,
        [
            "eval",
            f"ckpt={out / 'checkpoints' / 'final.pt'}",
            "save_predictions=true",
            f"paths.output_dir={eval_dir}",
            "trainer.device=cpu",
            "mode=slide",
            "data.test.crop_size=[64,64]",
            "data.test.stride=[32,32]",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert {"mIoU", "mAcc", "aAcc", "per_class"} <= set(metrics)
    assert "disc" in metrics["per_class"]
    from PIL import Image

    preds = sorted((eval_dir / "predictions").glob("*.png"))
    images = sorted((synth_seg / "images" / "validation").glob("*.jpg"))
    assert len(preds) == len(images)
    for p, i in zip(preds, images, strict=True):
        assert Image.open(p).size == Image.open(i).size  # original size
        assert max(Image.open(p).getextrema()) <= 8


def test_eval_bad_override_and_missing_checkpoint(tmp_path):
    result = runner.invoke(app, ["eval", f"ckpt={tmp_path / 'nope.pt'}"])
    assert result.exit_code == 1 and "nope.pt" in result.output


def test_train_cli_reports_bad_data_without_traceback(tmp_path):
    result = runner.invoke(
        app,
        [
            "train",
            *TINY_MODEL,
            f"data.root={tmp_path / 'missing'}",
            "trainer.max_iters=1",
            f"paths.output_dir={tmp_path / 'r'}",
            "trainer.num_workers=0",
        ],
    )
    assert result.exit_code == 1
    assert "dataset folder not found" in result.output and "Traceback" not in result.output


def test_layer_decay_groups_follow_the_official_constructor():
    from adapterctl.models.build import build_model

    cfg = compose("train", TINY_MODEL)
    model = build_model(cfg)
    groups = param_groups(model, lr=1.0, weight_decay=0.05, layer_decay_rate=0.9)
    by_name = {n: g for g in groups for n in g["names"]}
    depth = 4
    assert math.isclose(by_name["backbone.vit.patch_embed.proj.weight"]["lr"], 0.9 ** (depth + 1))
    assert math.isclose(by_name["backbone.vit.blocks.0.attn.qkv.weight"]["lr"], 0.9**depth)
    assert math.isclose(by_name["backbone.vit.blocks.3.mlp.fc1.weight"]["lr"], 0.9)
    for name in ("backbone.level_embed", "backbone.spm.stem.0.weight", "decode_head.conv_seg.weight"):
        assert by_name[name]["lr"] == 1.0
    assert by_name["backbone.vit.blocks.0.attn.qkv.bias"]["weight_decay"] == 0.0
    assert by_name["backbone.vit.blocks.0.ls1.gamma"]["weight_decay"] == 0.0  # 1-D
    assert by_name["backbone.vit.pos_embed"]["weight_decay"] == 0.05  # decayed, as in the official configs
    assert by_name["backbone.level_embed"]["weight_decay"] == 0.05
    custom = {
        n: g
        for g in param_groups(model, 1.0, 0.05, no_decay_keys=["level_embed", "pos_embed"], lr_mult={"head": 10.0})
        for n in g["names"]
    }
    assert custom["backbone.level_embed"]["weight_decay"] == 0.0 and custom["decode_head.conv_seg.weight"]["lr"] == 10


def test_poly_schedule_with_warmup_matches_mmcv():
    assert math.isclose(poly_warmup_factor(0, 100, warmup_iters=10, warmup_ratio=1e-6), 1e-6, rel_tol=1e-3)
    assert math.isclose(poly_warmup_factor(5, 100, warmup_iters=10, warmup_ratio=0.0), 0.95 * 0.5)
    assert math.isclose(poly_warmup_factor(50, 100, warmup_iters=10), 0.5)
    assert poly_warmup_factor(100, 100) == 0.0


def test_bf16_autocast_trains_and_predicts():
    """The AMP path (bf16 on CPU and GPU): both deformable-sampling forms, fp32 losses."""
    from adapterctl.models.build import build_model

    torch.manual_seed(0)
    model = build_model(compose("train", TINY_MODEL))
    x, y = torch.rand(2, 3, 64, 64) * 255, torch.randint(0, 8, (2, 64, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y)
    assert out["loss_decode"].dtype == torch.float32 and torch.isfinite(out["loss_decode"])
    (out["loss_decode"] + out["loss_aux"]).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32 = model.predict(x)
    assert fp32.shape == (2, 8, 64, 64) and torch.isfinite(fp32).all()


def test_amp_resolution():
    from adapterctl.engine.precision import resolve_amp

    assert resolve_amp("none", torch.device("cpu")) == "none"
    assert resolve_amp("auto", torch.device("cpu")) in ("bf16", "none")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_amp("fp16", torch.device("cpu"))


def test_predict_writes_label_maps_and_overlays(synth_seg, tmp_path):
    from PIL import Image

    out = tmp_path / "run"
    run_train(compose("train", tiny_train_overrides(synth_seg, out, max_iters=2)))
    images = synth_seg / "images" / "validation"
    result = runner.invoke(
        app,
        [
            "predict",
            str(out / "checkpoints" / "final.pt"),
            str(images),
            "--out",
            str(tmp_path / "pred"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    evaluated = runner.invoke(
        app,
        [
            "eval",
            f"ckpt={out / 'checkpoints' / 'final.pt'}",
            "save_predictions=true",
            f"paths.output_dir={tmp_path / 'ev'}",
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    for img in sorted(images.glob("*.jpg")):
        label = Image.open(tmp_path / "pred" / f"{img.stem}.png")
        assert label.size == Image.open(img).size and label.mode == "P"
        # one convention with `eval save_predictions` and the annotations: class k written k + 1, 0 = unlabelled
        low, high = label.getextrema()
        assert low >= 1 and high <= 8
        same = np.asarray(Image.open(tmp_path / "ev" / "predictions" / f"{img.stem}.png"))
        assert np.array_equal(np.asarray(label), same)
        assert (tmp_path / "pred" / f"{img.stem}_overlay.jpg").is_file()
    missing = runner.invoke(app, ["predict", str(out / "checkpoints" / "final.pt"), str(tmp_path / "nope.jpg")])
    assert missing.exit_code == 1 and "nope.jpg" in missing.output


@pytest.mark.parametrize("fmt", ["onnx", "torch_export", "torchscript"])
def test_export_matches_eager(synth_seg, tmp_path, fmt):
    out = tmp_path / "run"
    run_train(compose("train", tiny_train_overrides(synth_seg, out, max_iters=2, checkpoint_interval=100)))
    result = runner.invoke(
        app,
        [
            "export",
            f"ckpt={out / 'checkpoints' / 'final.pt'}",
            f"format={fmt}",
            "input_size=[64,96]",
            f"paths.output_dir={tmp_path / 'exp'}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "parity with eager" in result.output and "argmax agreement 100.00%" in result.output
    suffix = {"onnx": ".onnx", "torch_export": ".pt2", "torchscript": ".ts"}[fmt]
    assert (tmp_path / "exp" / f"final_64x96{suffix}").is_file()


def test_export_rejects_bad_size(synth_seg, tmp_path):
    out = tmp_path / "run"
    run_train(compose("train", tiny_train_overrides(synth_seg, out, max_iters=2, checkpoint_interval=100)))
    result = runner.invoke(app, ["export", f"ckpt={out / 'checkpoints' / 'final.pt'}", "input_size=[60,96]"])
    assert result.exit_code == 1 and "multiples of 32" in result.output


def test_gradient_clipping_is_applied_when_set(synth_seg, tmp_path, monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        seen.append(max_norm)
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    run_train(
        compose("train", tiny_train_overrides(synth_seg, tmp_path / "clip", max_iters=2) + ["optim.grad_clip=0.5"])
    )
    assert seen == [0.5, 0.5]
    seen.clear()
    run_train(compose("train", tiny_train_overrides(synth_seg, tmp_path / "noclip", max_iters=2)))
    assert seen == []  # the official configs do not clip


def test_resume_from_a_given_checkpoint_and_pruning_keeps_the_newest(synth_seg, tmp_path):
    out = tmp_path / "run"
    run_train(
        compose("train", tiny_train_overrides(synth_seg, out, max_iters=6, checkpoint_interval=1, keep_checkpoints=2))
    )
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [5, 6]  # 1..4 deleted from disk
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["final.pt", "iter_0000005.pt", "iter_0000006.pt"]
    # resume=PATH: another run directory continues from that checkpoint's step and state
    branch = tmp_path / "branch"
    given = out / "checkpoints" / "iter_0000005.pt"
    run_train(compose("train", tiny_train_overrides(synth_seg, branch, max_iters=6) + [f"resume={given}"]))
    assert _train_losses(branch).keys() == {6}
    assert math.isclose(_train_losses(branch)[6], _train_losses(out)[6], rel_tol=1e-6)
    missing = runner.invoke(
        app, ["train", *tiny_train_overrides(synth_seg, tmp_path / "b2"), f"resume={tmp_path}/no.pt"]
    )
    assert missing.exit_code == 1 and "no.pt" in missing.output


def test_bad_samples_are_skipped_and_reported_through_training(synth_seg, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_seg, data)
    broken = sorted((data / "images" / "training").glob("*.jpg"))[0]
    broken.write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    failing = runner.invoke(app, ["train", *tiny_train_overrides(data, out, max_iters=4)])
    assert failing.exit_code == 1 and broken.name in failing.output and "Traceback" not in failing.output
    result = runner.invoke(
        app, ["train", *tiny_train_overrides(data, tmp_path / "lenient", max_iters=4), "data.on_bad_sample=skip"]
    )
    assert result.exit_code == 0, result.output
    assert "skipped 1 bad sample" in result.output and broken.name in result.output


def test_load_from_starts_a_new_run_from_another_runs_weights(synth_seg, tmp_path):
    from adapterctl.models.build import build_model

    first = tmp_path / "stage1"
    run_train(compose("train", tiny_train_overrides(synth_seg, first, max_iters=2)))
    trained = ckpt.load_checkpoint(first / "checkpoints" / "final.pt")["model"]
    # a head with another class count (the 172 -> 151 step of the two-stage recipe): those tensors start fresh
    model = build_model(compose("train", TINY_MODEL + ["head.num_classes=5"]))
    found = ckpt.initialise_from(model, first / "checkpoints" / "final.pt")
    assert found["reinitialised"] == [
        "auxiliary_head.conv_seg.bias",
        "auxiliary_head.conv_seg.weight",
        "decode_head.conv_seg.bias",
        "decode_head.conv_seg.weight",
    ]
    assert found["absent"] == [] and found["unused"] == []
    torch.testing.assert_close(model.state_dict()["backbone.spm.stem.0.weight"], trained["backbone.spm.stem.0.weight"])
    second = tmp_path / "stage2"
    result = runner.invoke(
        app, ["train", *tiny_train_overrides(synth_seg, second, max_iters=2), f"load_from={first}/checkpoints/final.pt"]
    )
    assert result.exit_code == 0, result.output
    assert "initialised from" in result.output and sorted(_train_losses(second)) == [1, 2]  # a fresh step count
    missing = runner.invoke(
        app, ["train", *tiny_train_overrides(synth_seg, tmp_path / "s3"), f"load_from={tmp_path}/no.pt"]
    )
    assert missing.exit_code == 1 and "no.pt" in missing.output and not (tmp_path / "s3").exists()


def test_the_loop_reads_losses_back_only_at_its_log_interval(synth_seg, tmp_path, monkeypatch):
    """No host synchronisation per step: the loop itself (engine/train.py) turns device tensors into Python numbers
    only when it logs, checkpoints or evaluates (nanoGPT's and torchvision's references do the same)."""
    import sys

    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            if sys._getframe(1).f_code.co_filename.endswith("engine/train.py"):
                reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    cfg = compose("train", tiny_train_overrides(synth_seg, tmp_path / "run", max_iters=6, log_interval=3,
                                                checkpoint_interval=100, eval_interval=100))  # fmt: skip
    run_train(cfg)
    monkeypatch.undo()
    assert reads == ["tolist", "tolist"], reads  # iterations 3 and 6 (the log rows), one transfer each
    assert sorted(_train_losses(tmp_path / "run")) == [3, 6]
