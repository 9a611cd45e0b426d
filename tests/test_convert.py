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
    sd["neck.lateral.weight"] = torch.zeros(3, 4, 1, 1)  # a module adapterctl has no place for
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
    assert "neck.lateral.weight" in text and "not converted" in text  # listed, not dropped silently
    tensors = load_file(str(dst))
    assert len(tensors) == 298 and all(k.startswith("backbone.") for k in tensors)
    with safe_open(str(dst), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "adapterctl" and json.loads(meta["config"])["model"]["embed_dim"] == 64
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


def test_convert_official_upernet_checkpoint_reproduces_mmseg_heads(tmp_path):
    """A full mmseg checkpoint: a 32-d backbone in the official layout + the UperNet/FCN fixture heads."""
    from adapterctl.engine.checkpoint import load_checkpoint
    from adapterctl.models.build import build_segmentor
    from adapterctl.models.official import to_official_backbone
    from adapterctl.models.zoo import build_vit_adapter

    from .conftest import FIXTURES

    fx = torch.load(FIXTURES / "official_upernet_a.pt", map_location="cpu", weights_only=True)
    kwargs = dict(
        img_size=32,
        embed_dim=32,
        depth=4,
        num_heads=2,
        conv_inplane=8,
        deform_num_heads=2,
        interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]],
    )
    torch.manual_seed(0)
    backbone = build_vit_adapter(**kwargs)
    official = {f"backbone.{k}": v for k, v in to_official_backbone(backbone.state_dict()).items()}
    official.update(fx["state_dict"])
    src = tmp_path / "upernet_official.pth"
    torch.save({"meta": {"CLASSES": list("abcdefg")}, "state_dict": official}, src)
    dst = tmp_path / "upernet.safetensors"
    overrides = [f"model.{k}={json.dumps(v)}".replace(" ", "") for k, v in kwargs.items()]
    result = runner.invoke(app, ["convert", str(src), str(dst), *overrides])
    assert result.exit_code == 0, result.output
    assert "segmentor" in result.output

    state = load_checkpoint(dst)
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(state["config"])
    assert cfg.head.num_classes == 7 and cfg.head.decode.channels == 16 and cfg.head.auxiliary.channels == 8
    model = build_segmentor(cfg).eval()
    model.load_state_dict(state["model"])
    with torch.no_grad():
        torch.testing.assert_close(model.decode_head(fx["inputs"]), fx["decode_logits"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.auxiliary_head(fx["inputs"]), fx["aux_logits"], atol=1e-4, rtol=1e-4)
    for k, v in backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[k], v)


_TINY_DET = dict(
    img_size=32, embed_dim=16, depth=4, num_heads=2, conv_inplane=8, deform_num_heads=2,
    interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]],
)  # fmt: skip


def _convert_official_detector(tmp_path, fixture: str, *extra: str, ema_shift: float | None = None):
    """A full mmdet checkpoint: a 16-d ViT-Adapter in the official layout + a head fixture's tensors, converted
    with ``--variant detection``. Returns (fixture, converted state, its config, the command's output).
    ``ema_shift``: the file also carries mmdet EMAHook buffers (``ema_<key>``: each float entry + the shift)."""
    from omegaconf import OmegaConf

    from adapterctl.engine.checkpoint import load_checkpoint
    from adapterctl.models.official import to_official_backbone
    from adapterctl.models.zoo import build_vit_adapter

    from .conftest import FIXTURES

    fx = torch.load(FIXTURES / fixture, map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    backbone = build_vit_adapter(**_TINY_DET, vit_feature_mode="final")
    tmp_path.mkdir(parents=True, exist_ok=True)
    official = {f"backbone.{k}": v for k, v in to_official_backbone(backbone.state_dict()).items()}
    official.update(fx["state_dict"])
    if ema_shift is not None:
        official.update({
            "ema_" + k.replace(".", "_"): (v + ema_shift if v.is_floating_point() else v.clone())
            for k, v in official.items()
        })  # fmt: skip
    src = tmp_path / "official.pth"
    torch.save({"meta": {"CLASSES": ["a", "b", "c"]}, "state_dict": official}, src)
    dst = tmp_path / "converted.safetensors"
    overrides = [f"model.{k}={json.dumps(v)}".replace(" ", "") for k, v in _TINY_DET.items()]
    result = runner.invoke(
        app, ["convert", str(src), str(dst), "--variant", "detection", "data=synthetic_det", *extra, *overrides]
    )
    assert result.exit_code == 0, result.output
    state = load_checkpoint(dst)
    return fx, state, OmegaConf.create(state["config"]), result.output


def test_convert_official_maskrcnn_checkpoint(tmp_path):
    """A full mmdet checkpoint: a 16-d backbone in the official layout + the Mask R-CNN fixture heads."""
    from collections import OrderedDict

    from adapterctl.models.build import build_detector

    fx, state, cfg, output = _convert_official_detector(tmp_path, "official_maskrcnn_a.pt")
    assert "detector" in output
    assert cfg.task == "detection" and cfg.head.num_classes == 3 and cfg.head.fpn_channels == 32
    model = build_detector(cfg).eval()
    model.load_state_dict(state["model"])  # strict: every tensor converted
    with torch.no_grad():
        feats = model.backbone.fpn(OrderedDict((str(i), f) for i, f in enumerate(fx["inputs"])))
        for got, want in zip(feats.values(), fx["neck_outs"], strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        h, w = fx["meta"]["img_shape"]
        x = model.roi_heads.box_head(model.roi_heads.box_roi_pool(feats, [fx["proposals"][:, :4]], [(h, w)]))
        cls, _ = model.roi_heads.box_predictor(x)
    torch.testing.assert_close(cls[:, [1, 2, 3, 0]], fx["roi_cls_score"], atol=1e-5, rtol=1e-5)


def test_convert_official_cascade_checkpoint(tmp_path):
    """A full mmdet Cascade checkpoint (16-d backbone in the official layout + the Cascade fixture heads): convert
    recognises the family from its keys, reads the widths, and the converted heads give the official stages."""
    from collections import OrderedDict

    from adapterctl.models.build import build_model

    fx, state, cfg, output = _convert_official_detector(tmp_path, "official_cascade_a.pt")
    assert "Cascade Mask R-CNN" in output and "not converted" not in output
    assert (cfg.head.name, cfg.head.num_classes, cfg.head.fpn_channels) == ("cascade_maskrcnn", 3, 32)
    assert (cfg.head.conv_channels, cfg.head.fc_channels, cfg.head.mask_channels) == (16, 64, 16)
    model = build_model(cfg).eval()
    model.load_state_dict(state["model"])  # strict: every tensor converted
    with torch.no_grad():
        feats = model.backbone.fpn(OrderedDict((str(i), f) for i, f in enumerate(fx["inputs"])))
        stages = model.roi_heads.stage_outputs(feats, fx["proposals"][:, :4], tuple(fx["meta"]["img_shape"]))
    for ours, want in zip(stages, fx["stages"], strict=True):
        torch.testing.assert_close(ours["cls_score"], want["cls_score"], atol=1e-4, rtol=0)
        torch.testing.assert_close(ours["bbox_pred"], want["bbox_pred"], atol=1e-4, rtol=0)


def test_convert_official_htc_checkpoint(tmp_path):
    """A full mmdet HTC++ checkpoint (16-d backbone + the HTC fixture's neck.0 / neck.1 / RPN / RoI heads):
    recognised as HTC++, ExtraAttention and semantic widths read off, the converted model gives the official
    ExtraAttention, FPN and semantic outputs."""
    from adapterctl.models.build import build_model

    fx, state, cfg, output = _convert_official_detector(tmp_path, "official_htc_a.pt", "head.extra_attention_heads=4")
    assert "HTC++" in output and "not converted" not in output
    assert (cfg.head.name, cfg.head.num_classes, cfg.head.semantic_classes, cfg.head.fpn_channels) == ("htc", 3, 9, 32)
    model = build_model(cfg).eval()
    model.load_state_dict(state["model"])  # strict
    with torch.no_grad():
        maps = model.backbone.extra_attention(list(fx["inputs"]))
        torch.testing.assert_close(maps[-1], fx["extra_attention_out"], atol=1e-5, rtol=0)
        feats = model.backbone.fpn(dict((str(i), f) for i, f in enumerate(maps)))
        logits, _ = model.roi_heads.semantic(feats)
    torch.testing.assert_close(logits, fx["semantic_pred"], atol=1e-4, rtol=0)


def test_convert_official_htc_beit_checkpoint(tmp_path):
    """An official HTC++ BEiT-Adapter file (the detection copy of BEiT: per-window tables, their index buffers, no
    cls token) converts with --model beit_adapter_l --variant detection and loads strict."""
    from omegaconf import OmegaConf

    from adapterctl.engine.checkpoint import load_checkpoint
    from adapterctl.models.beit_adapter import build_from_config
    from adapterctl.models.build import build_model
    from adapterctl.models.official import to_official_backbone

    from .conftest import FIXTURES

    fx = torch.load(FIXTURES / "official_htc_a.pt", map_location="cpu", weights_only=True)
    kwargs = dict(
        img_size=32, embed_dim=16, depth=4, num_heads=2, conv_inplane=8, deform_num_heads=2, init_values=0.1,
        interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]], window_size=[3, 3, 3, 5],
    )  # fmt: skip
    backbone = build_from_config("l", "detection", **kwargs)  # what model=beit_adapter_l + the overrides build
    official = {f"backbone.{k}": v for k, v in to_official_backbone(backbone.state_dict()).items()}
    for i, block in enumerate(backbone.trunk.vit.blocks):  # the official blocks keep their index buffers
        official[f"backbone.blocks.{i}.attn.relative_position_index"] = block.attn.relative_position_index
    assert not any("cls_token" in k for k in official)
    official.update(fx["state_dict"])
    src = tmp_path / "htc_beit_official.pth"
    torch.save({"state_dict": official}, src)
    dst = tmp_path / "htc_beit.safetensors"
    overrides = [f"model.{k}={json.dumps(v)}".replace(" ", "") for k, v in kwargs.items()]
    result = runner.invoke(
        app,
        ["convert", str(src), str(dst), "--model", "beit_adapter_l", "--variant", "detection", "data=synthetic_det",
         "head.extra_attention_heads=4", *overrides],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "HTC++" in result.output and "not converted" not in result.output
    state = load_checkpoint(dst)
    cfg = OmegaConf.create(state["config"])
    assert (cfg.model.family, cfg.model.layout, cfg.head.name) == ("beit_adapter", "detection", "htc")
    model = build_model(cfg).eval()
    model.load_state_dict(state["model"])  # strict
    for k, v in backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.body.state_dict()[k], v)


def test_convert_an_ema_checkpoint_takes_the_trained_weights_or_with_ema_the_averages(tmp_path):
    """mmdet's EMAHook (the HTC++ O365 config) leaves ema_* copies of every entry in the checkpoint: skipped by
    default with one line saying so (the official evaluation used the trained weights), converted with --ema."""
    fx, plain, _, _ = _convert_official_detector(
        tmp_path / "plain", "official_htc_a.pt", "head.extra_attention_heads=4"
    )
    _, state, _, output = _convert_official_detector(
        tmp_path / "ema", "official_htc_a.pt", "head.extra_attention_heads=4", ema_shift=1.0
    )
    text = " ".join(output.split())
    assert "skipped" in text and "ema_* buffers" in text and "not converted" not in text
    assert state["model"].keys() == plain["model"].keys()
    assert all(torch.equal(state["model"][k], v) for k, v in plain["model"].items())
    _, averaged, _, output = _convert_official_detector(
        tmp_path / "avg", "official_htc_a.pt", "head.extra_attention_heads=4", "--ema", ema_shift=1.0
    )
    assert "converted the EMA averages" in " ".join(output.split())
    floats = [k for k, v in plain["model"].items() if v.is_floating_point()]
    assert floats and all(torch.allclose(averaged["model"][k], plain["model"][k] + 1.0) for k in floats)
    result = runner.invoke(app, ["convert", str(tmp_path / "plain" / "official.pth"), str(tmp_path / "x.safetensors"),
                                 "--variant", "detection", "--ema"])  # fmt: skip
    assert result.exit_code != 0 and "no ema_* buffers" in result.output and "Traceback" not in result.output
