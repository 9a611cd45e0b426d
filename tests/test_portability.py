"""A checkpoint is enough: train with a local pretrained file, delete it, move the run and the data; eval,
predict and export still work and give the numbers of before the move."""

from __future__ import annotations

import json
import shutil

import torch
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

from adapterctl.cli import app
from adapterctl.config import compose
from adapterctl.engine import checkpoint as ckpt
from adapterctl.engine.train import run_train

from .conftest import tiny_train_overrides

runner = CliRunner()


def test_a_moved_run_evaluates_predicts_and_exports_without_its_pretrained_file(synth_seg, tmp_path, monkeypatch):
    torch.manual_seed(0)
    source = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=2, num_classes=0)
    weights = tmp_path / "weights" / "tiny_vit.pth"
    weights.parent.mkdir()
    torch.save(source.state_dict(), weights)
    old_root = tmp_path / "old_datasets"
    shutil.copytree(synth_seg, old_root / "synthetic_seg")
    monkeypatch.setenv("ADAPTERCTL_DATASETS", str(old_root))

    run = tmp_path / "old_place" / "run"
    overrides = [o for o in tiny_train_overrides(synth_seg, run, max_iters=2) if not o.startswith("data.root=")]
    result = runner.invoke(app, ["train", *overrides, f"model.pretrained={weights}"])
    assert result.exit_code == 0, result.output
    assert "loaded" in result.output and "tiny_vit.pth" in result.output
    trained = json.loads((run / "metrics.json").read_text())
    state = ckpt.load_checkpoint(run / "checkpoints" / "final.pt")
    drift = (state["model"]["backbone.vit.patch_embed.proj.weight"] - source.patch_embed.proj.weight).abs().max()
    assert drift < 0.01  # training started from the file's weights
    assert state["config"]["data"]["root"] == "${paths.datasets}/synthetic_seg"  # stored unresolved

    weights.unlink()
    moved = tmp_path / "new_place" / "run"
    shutil.move(run, moved)
    new_root = tmp_path / "new_datasets"
    shutil.move(old_root, new_root)
    final = moved / "checkpoints" / "final.pt"

    monkeypatch.setenv("ADAPTERCTL_DATASETS", str(tmp_path / "nowhere"))
    by_root = runner.invoke(app, ["eval", f"ckpt={final}", f"data.root={new_root / 'synthetic_seg'}"])
    assert by_root.exit_code == 0, by_root.output
    monkeypatch.setenv("ADAPTERCTL_DATASETS", str(new_root))
    by_env = runner.invoke(app, ["eval", f"ckpt={final}", f"paths.output_dir={tmp_path / 'ev_env'}"])
    assert by_env.exit_code == 0, by_env.output
    evals = sorted(moved.glob("eval_*/metrics.json")) + [tmp_path / "ev_env" / "metrics.json"]
    assert len(evals) == 2
    for path in evals:
        again = json.loads(path.read_text())
        for key in ("mIoU", "mAcc", "aAcc"):
            assert again[key] == trained[key], (path, key)

    image = next((new_root / "synthetic_seg" / "images" / "validation").iterdir())
    pred = runner.invoke(
        app, ["predict", str(final), str(image), "--out", str(tmp_path / "pred"), "data.test.mode=whole"]
    )
    assert pred.exit_code == 0, pred.output
    assert (tmp_path / "pred" / f"{image.stem}.png").is_file()
    bad = runner.invoke(app, ["predict", str(final), str(image), "data.test.nope=1"])
    assert bad.exit_code == 2 and "data.test.nope" in bad.output

    bench = runner.invoke(app, ["bench", "--ckpt", str(final), "--input", "64", "--runs", "1", "--warmup", "0"])
    assert bench.exit_code == 0, bench.output
    assert "forward_s" in bench.output and "train_step_forward_backward_s" in bench.output

    export = runner.invoke(
        app, ["export", f"ckpt={final}", "format=torch_export", "input_size=[64,64]", f"paths.output_dir={tmp_path}"]
    )
    assert export.exit_code == 0, export.output
    assert "parity with eager" in export.output and (tmp_path / "final_64x64.pt2").is_file()


def test_resume_never_reads_the_pretrained_file(synth_seg, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "vit.pth"
    torch.save(VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=2).state_dict(), weights)
    run = tmp_path / "run"
    pretrained = f"model.pretrained={weights}"
    run_train(compose("train", tiny_train_overrides(synth_seg, run, max_iters=2) + [pretrained]))
    weights.unlink()
    first = ckpt.load_checkpoint(run / "checkpoints" / "iter_0000002.pt")["model"]
    resumed = tiny_train_overrides(synth_seg, run, max_iters=4) + [pretrained, "resume=true"]
    run_train(compose("train", resumed))
    assert ckpt.load_checkpoint(run / "checkpoints" / "iter_0000004.pt")["step"] == 4
    assert set(first) == set(ckpt.load_checkpoint(run / "checkpoints" / "iter_0000004.pt")["model"])
