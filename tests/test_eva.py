"""DINOv3 and EVA-02 (timm ``Eva``: RoPE, registers, SwiGLU) through TimmEvaTrunk."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from adapterctl.models.trunks import trunk_for
from adapterctl.models.trunks_eva import TimmEvaTrunk
from adapterctl.models.vit_adapter import ViTAdapter

FAMILIES = ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb", "eva02_tiny_patch14_224"]


def _eva(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, img_size=64, embed_dim=64, depth=4, num_heads=2, num_classes=0,
                            **kw)  # fmt: skip
    vit.norm = nn.Identity()
    with torch.no_grad():  # random prefix and position tensors, so a misuse shows
        for t in (vit.pos_embed, vit.cls_token, vit.reg_token):
            if t is not None:
                t.normal_(0, 0.5)
    return vit


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("name", FAMILIES)
def test_the_trunk_computes_what_timm_does_at_any_grid(name, dynamic):
    """RoPE for the input's own token grid (7 x 9, not the 64-pixel build size), prefix tokens carried across
    two interaction groups: bit for bit timm's dynamic-size forward_features, also for a model built without
    dynamic_img_size (whose RoPE caches its build grid)."""
    reference = _eva(name, dynamic_img_size=True).eval()
    vit = _eva(name, dynamic_img_size=dynamic).eval()
    vit.load_state_dict(reference.state_dict())
    trunk = trunk_for(vit)
    assert isinstance(trunk, TimmEvaTrunk)
    p = trunk.patch_size
    x = torch.randn(2, 3, 7 * p, 9 * p)
    with torch.no_grad():
        tokens, prefix, hw = trunk.embed(x)
        tokens, prefix = trunk.run_blocks(tokens, prefix, 0, 1, hw, checkpoint=False)
        tokens, prefix = trunk.run_blocks(tokens, prefix, 2, 3, hw, checkpoint=True)
        want = reference.forward_features(x)
    assert hw == (7, 9)
    got = tokens if prefix is None else torch.cat([prefix, tokens], 1)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_adapter_pyramid_and_gradients(name):
    vit = _eva(name)
    model = ViTAdapter(vit, interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]], conv_inplane=8,
                       deform_num_heads=2).train()  # fmt: skip
    outs = model(torch.randn(1, 3, 224, 160))
    assert [tuple(o.shape[-2:]) for o in outs] == [(56, 40), (28, 20), (14, 10), (7, 5)]
    sum(o.pow(2).mean() for o in outs).backward()
    assert vit.cls_token.grad.abs().sum() > 0 and vit.blocks[0].attn.proj.weight.grad.abs().sum() > 0
    if vit.reg_token is not None:
        assert vit.reg_token.grad.abs().sum() > 0


def test_original_dinov3_layout_loads(tmp_path):
    """DINOv3's own key names (storage_tokens, ls1/ls2.gamma, a fused qkv bias, rope periods, mask_token)."""

    src = _eva("vit_small_patch16_dinov3_qkvb")
    sd = src.state_dict()
    original = {}
    for key, value in sd.items():
        if key.endswith("attn.q_bias"):
            v = sd[key.replace("q_bias", "v_bias")]
            original[key.replace("q_bias", "qkv.bias")] = torch.cat([value, torch.zeros_like(value), v])
            continue
        if key.endswith("attn.v_bias"):
            continue
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        original[key] = value
    original["mask_token"] = torch.zeros(1, 64)
    original["rope_embed.periods"] = torch.ones(8)
    path = tmp_path / "dinov3_vits16_pretrain.pth"
    torch.save(original, path)
    dst = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, img_size=64, embed_dim=64, depth=4,
                            num_heads=2, num_classes=0)  # fmt: skip
    dst.norm = nn.Identity()
    model = ViTAdapter(dst, interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]], conv_inplane=8, deform_num_heads=2)
    report = model.trunk.load_pretrained(path)
    assert not report.missing, report
    for key, value in sd.items():
        torch.testing.assert_close(dst.state_dict()[key], value, atol=0, rtol=0, msg=key)


_SMALL = dict(interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]], conv_inplane=8, deform_num_heads=2,
              drop_path_rate=0.1)  # fmt: skip


def _entries():
    from adapterctl.models.summary import entry_points

    return sorted(entry_points())


@pytest.mark.parametrize("name", _entries())
def test_every_entry_point_builds_runs_forward_and_backward_small(name):
    from adapterctl.models.summary import entry_points

    fn = entry_points()[name]
    width = dict(embed_dim=64, depth=4, num_heads=2)
    if name.startswith("vit_adapter_") or name.startswith("beit_adapter_"):
        model = fn(**_SMALL, **width, img_size=64)
    else:
        model = fn(**_SMALL, img_size=64, vit_kwargs=width)
    outs = model.train()(torch.randn(2, 3, 64, 64))
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    sum(o.pow(2).mean() for o in outs).backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("vit.blocks.0.")]
    assert grads and all(g is not None for g in grads), name


def test_eva02_timm_safetensors_round_trip_and_layer_ids(tmp_path):
    from safetensors.torch import save_file

    from adapterctl.engine.optim import layer_id

    src = _eva("eva02_tiny_patch14_224")
    path = tmp_path / "eva02_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = _eva("eva02_tiny_patch14_224")
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    model = ViTAdapter(dst, interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]], conv_inplane=8, deform_num_heads=2)
    report = model.trunk.load_pretrained(path)
    assert not report.missing
    for key, value in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[key], value, atol=0, rtol=0, msg=key)
    assert layer_id("backbone.vit.reg_token", 6) == 0 and layer_id("backbone.vit.blocks.2.mlp.fc1_g.weight", 6) == 3
