"""`adapterctl convert`: an official checkpoint file in, an adapterctl safetensors file out."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from adapterctl.cli import app
from adapterctl.models.official import from_official

runner = CliRunner()


def _official_file(tmp_path, official_tiny):
    sd = {f"backbone.{k}": v for k, v in official_tiny["state_dict"].items()}
    sd["decode_head.conv_seg.weight"] = torch.zeros(3, 4, 1, 1)
    sd["decode_head.conv_seg.bias"] = torch.zeros(3)
    path = tmp_path / "official.pth"
    torch.save({"meta": {"CLASSES": ["a", "b", "c"], "mmcv_version": "1.4.2"}, "state_dict": sd}, path)
    return path


def _overrides(cfg: dict) -> list[str]:
    keys = (
        "img_size",
        "embed_dim",
        "depth",
        "num_heads",
        "conv_inplane",
        "deform_num_heads",
        "deform_ratio",
        "interaction_indexes",
        "drop_path_rate",
    )
    return [f"model.{k}={json.dumps(cfg[k])}".replace(" ", "") for k in keys]


def test_convert_official_checkpoint_round_trip(tmp_path, official_tiny):
    src = _official_file(tmp_path, official_tiny)
    dst = tmp_path / "out" / "converted.safetensors"
    result = runner.invoke(
        app, ["convert", str(src), str(dst), "--model", "vit_adapter_t", *_overrides(official_tiny["config"])]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "decode_head.conv_seg.weight" in text and "not converted" in text  # listed, not dropped silently
    tensors = load_file(str(dst))
    assert len(tensors) == 298 and all(k.startswith("backbone.") for k in tensors)
    with safe_open(str(dst), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "adapterctl" and json.loads(meta["model_config"])["embed_dim"] == 64
    # the converted weights give the official outputs
    model = from_official(official_tiny["config"]).eval()
    model.load_state_dict({k.removeprefix("backbone."): v for k, v in tensors.items()})
    with torch.no_grad():
        for got, want in zip(model(official_tiny["input"]), official_tiny["outputs"], strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not list(dst.parent.glob("*.tmp"))


def test_convert_wrong_model_is_a_clear_error(tmp_path, official_tiny):
    src = _official_file(tmp_path, official_tiny)
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "x.safetensors"), "--model", "vit_adapter_s"])
    assert result.exit_code == 1
    assert "does not fit model 'vit_adapter_s'" in " ".join(result.output.split())
    assert not (tmp_path / "x.safetensors").exists()


def test_convert_missing_file(tmp_path):
    result = runner.invoke(app, ["convert", str(tmp_path / "nope.pth"), str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1 and "nope.pth" in result.output
