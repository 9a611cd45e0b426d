"""A real 2-process torchrun (gloo) training run: DDP, SyncBN conversion, sharded exact evaluation."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from adapterctl.cli import app

from .conftest import tiny_train_overrides, torchrun_train


def test_torchrun_two_processes_train_and_evaluate_each_image_once(synth_seg, tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun_train(tiny_train_overrides(synth_seg, out, max_iters=2, batch_size=2))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp_metrics = json.loads((out / "metrics.json").read_text())
    state_dir = out / "checkpoints"
    assert (state_dir / "iter_0000002.pt").is_file()
    assert (out / "config.yaml").is_file() and not list(tmp_path.glob("runs"))  # one run directory
    # 3 validation images over 2 ranks: a padding DistributedSampler would count one twice
    single = tmp_path / "single"
    result = CliRunner().invoke(
        app, ["eval", f"ckpt={state_dir / 'iter_0000002.pt'}", f"paths.output_dir={single}", "trainer.device=cpu"]
    )
    assert result.exit_code == 0, result.output
    one = json.loads((single / "metrics.json").read_text())
    for key in ("mIoU", "mAcc", "aAcc"):
        assert abs(one[key] - ddp_metrics[key]) < 1e-6, (key, one[key], ddp_metrics[key])


def test_torchrun_two_processes_train_mask2former(synth_seg, tmp_path):
    """Mask2Former under DDP: the matched-mask count is averaged across ranks inside the loss (a collective per
    prediction), every parameter gets a gradient (no unused-parameter error), and the run evaluates."""
    out = tmp_path / "m2f"
    head = [
        "head=mask2former", "head.decode.feat_channels=32", "head.decode.num_heads=4", "head.decode.ffn_channels=64",
        "head.decode.num_queries=8", "head.decode.num_points=256", "head.decode.with_cp=false",
    ]  # fmt: skip
    base = [o for o in tiny_train_overrides(synth_seg, out, max_iters=2, batch_size=2) if not o.startswith("head.")]
    proc = torchrun_train([*base, *head])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 100.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss_cls.d0" in r]
    assert train and all(r["train/loss"] > r["train/loss_cls"] for r in train)  # deep supervision is summed in
