"""BEiT-Adapter (timm Beit through TimmBeitTrunk) against the official BEiTAdapter fixture (beit_README.md §2)."""

from __future__ import annotations

import pytest
import torch

from adapterctl.config import compose
from adapterctl.models.beit_adapter import build_beit_adapter

from .conftest import FIXTURES

_VIT_KEYS = ("cls_token", "patch_embed.", "blocks.")


@pytest.fixture(scope="module")
def fx() -> dict:
    return torch.load(FIXTURES / "official_beit_adapter_a.pt", map_location="cpu", weights_only=True)


def _model(fx: dict) -> torch.nn.Module:
    c = fx["config"]
    model = build_beit_adapter(
        img_size=c["img_size"],
        embed_dim=c["embed_dim"],
        depth=c["depth"],
        num_heads=c["num_heads"],
        mlp_ratio=c["mlp_ratio"],
        init_values=c["init_values"],
        drop_path_rate=c["drop_path_rate"],
        interaction_indexes=c["interaction_indexes"],
        conv_inplane=c["conv_inplane"],
        n_points=c["n_points"],
        deform_num_heads=c["deform_num_heads"],
        cffn_ratio=c["cffn_ratio"],
        deform_ratio=c["deform_ratio"],
        with_cp=c["with_cp"],
    )
    official = {("vit." + k if k.startswith(_VIT_KEYS) else k): v for k, v in fx["state_dict"].items()}
    ours = model.state_dict()
    index_keys = [k for k in official if k.endswith("relative_position_index")]
    for key in index_keys:  # timm keeps the index as a non-persistent buffer: the same structure, checked here
        assert torch.equal(model.get_submodule(key.rsplit(".", 1)[0]).relative_position_index, official[key]), key
    weights = {k: v for k, v in official.items() if k not in index_keys}
    assert sorted(weights) == sorted(ours)  # every official tensor has its place, and no other is needed
    model.load_state_dict(weights, strict=True)
    return model.eval()


def test_outputs_match_the_official_beit_adapter(fx):
    model = _model(fx)
    with torch.no_grad():
        outs = model(fx["input"])
    for ours, want in zip(outs, fx["outputs"], strict=True):
        torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)


def test_gradients_match_including_the_carried_cls_token(fx):
    model = _model(fx)
    x = fx["input"].clone().requires_grad_(True)
    loss = sum(o.pow(2).mean() for o in model(x))
    assert abs(float(loss.detach()) - fx["meta"]["loss_for_grads"]) < 1e-4 * abs(fx["meta"]["loss_for_grads"])
    loss.backward()
    params = dict(model.named_parameters())
    for name, want in fx["grads"].items():
        got = x.grad if name == "input" else params["vit." + name if name.startswith(_VIT_KEYS) else name].grad
        scale = float(want.abs().max())
        assert float((got - want).abs().max()) <= 1e-3 * scale + 1e-7, name  # cls_token's grad: it is carried


def test_relative_position_bias_of_block_0(fx):
    model = _model(fx)
    with torch.no_grad():
        bias = model.vit.blocks[0].attn._get_rel_pos_bias()
    torch.testing.assert_close(bias[0], fx["rel_pos_bias_block0"], atol=1e-6, rtol=1e-6)


def test_an_input_of_another_size_is_refused_naming_both(fx):
    model = _model(fx)
    with pytest.raises(ValueError, match=r"built for 128x128 inputs .* got 160x128"):
        model(torch.randn(1, 3, 160, 128))


def test_interpolated_rel_pos_bias_runs_other_sizes_and_says_it_is_not_official(fx):
    from adapterctl.models.trunks_beit import resized_rel_pos_bias

    model = _model(fx)
    attn = model.vit.blocks[0].attn
    with torch.no_grad():  # at the model's own window the resize is the identity
        same = resized_rel_pos_bias(attn, tuple(attn.window_size))
    torch.testing.assert_close(same[0], attn._get_rel_pos_bias()[0], atol=0, rtol=0)
    model.trunk.interpolate_rel_pos = True
    with torch.no_grad():  # its own size still runs the official path
        torch.testing.assert_close(model(fx["input"])[0], fx["outputs"][0], atol=1e-4, rtol=1e-4)
    table = attn.relative_position_bias_table
    x = torch.randn(1, 3, 160, 128)
    with pytest.warns(UserWarning, match="not the official computation"):
        outs = model.train()(x)
    assert [tuple(o.shape[-2:]) for o in outs] == [(40, 32), (20, 16), (10, 8), (5, 4)]
    sum(o.pow(2).mean() for o in outs).backward()
    assert attn.relative_position_bias_table is table  # set back after each block
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_beit_adapter_l_config_builds_at_the_official_size():
    from adapterctl.models.build import build_model

    cfg = compose("train", ["model=beit_adapter_l"])
    assert (cfg.model.img_size, cfg.model.init_values, cfg.model.with_cp) == (640, 1e-6, True)
    with torch.device("meta"):
        model = build_model(cfg)
    assert sum(p.numel() for p in model.backbone.parameters()) == 328_756_928  # configs-and-results.md §3.2


def test_an_official_upernet_beit_checkpoint_converts_and_runs(fx, tmp_path):
    """A full mmseg-layout checkpoint (backbone.* of the fixture, UperNet + FCN heads) through `adapterctl convert`:
    the converted file alone rebuilds the model, which gives the official backbone outputs."""
    from PIL import Image
    from typer.testing import CliRunner

    from adapterctl.cli import app
    from adapterctl.models.build import load_model_from_checkpoint
    from adapterctl.models.heads import FCNHead, UPerHead

    torch.manual_seed(0)
    heads = {
        **{f"decode_head.{k}": v for k, v in UPerHead([64] * 4, channels=16, num_classes=7).state_dict().items()},
        **{f"auxiliary_head.{k}": v for k, v in FCNHead(64, channels=8, num_classes=7).state_dict().items()},
    }
    src = tmp_path / "upernet_beit_adapter_tiny_128.pth"
    torch.save({"state_dict": {**fx["state_dict_mmseg"], **heads}, "meta": {"note": "official layout"}}, src)
    c = fx["config"]
    size = [
        f"model.img_size={c['img_size']}", f"model.embed_dim={c['embed_dim']}", f"model.depth={c['depth']}",
        f"model.num_heads={c['num_heads']}", f"model.init_values={c['init_values']}", "model.drop_path_rate=0.0",
        "model.interaction_indexes=[[0,0],[1,1],[2,2],[3,3]]", f"model.conv_inplane={c['conv_inplane']}",
        f"model.deform_num_heads={c['deform_num_heads']}", "model.with_cp=false",
        "data.test.scale=[512,128]", "data.test.mode=slide", "data.test.crop_size=[128,128]",
        "data.test.stride=[96,96]",
    ]  # fmt: skip
    dst = tmp_path / "beit.safetensors"
    result = CliRunner().invoke(app, ["convert", str(src), str(dst), "--model", "beit_adapter_l", *size])
    assert result.exit_code == 0, result.output
    assert "keys not converted" not in result.output  # the rel-pos index buffers agree with the model's own
    model, cfg, _ = load_model_from_checkpoint(dst)
    assert cfg.model.family == "beit_adapter" and cfg.head.num_classes == 7
    with torch.no_grad():
        outs = model.eval().backbone(fx["input"])
    for ours, want in zip(outs, fx["outputs"], strict=True):
        torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.decode_head.conv_seg.weight, heads["decode_head.conv_seg.weight"])
    image = tmp_path / "photo.png"
    Image.fromarray((torch.rand(150, 200, 3) * 255).byte().numpy()).save(image)
    pred = CliRunner().invoke(
        app, ["predict", str(dst), str(image), "--out", str(tmp_path / "pred"), "--device", "cpu"]
    )
    assert pred.exit_code == 0, pred.output  # slide windows of the model's own size
    assert Image.open(tmp_path / "pred" / "photo.png").size == (200, 150)
