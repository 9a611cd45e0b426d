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


def test_beit_adapter_l_config_builds_at_the_official_size():
    from adapterctl.models.build import build_model

    cfg = compose("train", ["model=beit_adapter_l"])
    assert (cfg.model.img_size, cfg.model.init_values, cfg.model.with_cp) == (640, 1e-6, True)
    with torch.device("meta"):
        model = build_model(cfg)
    assert sum(p.numel() for p in model.backbone.parameters()) == 328_756_928  # configs-and-results.md §3.2
