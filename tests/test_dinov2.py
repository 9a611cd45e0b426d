"""DINOv2 at patch 14 (TimmPrefixViTTrunk: cls and register tokens carried, no kernel resampling) and the
frozen-ViT mode."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from adapterctl.models.trunks import TimmPrefixViTTrunk, TimmViTTrunk, trunk_for
from adapterctl.models.vit_adapter import ViTAdapter

FAMILIES = ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"]


def _dinov2(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, img_size=70, embed_dim=64, depth=4, num_heads=2, num_classes=0,
                            init_values=0.5, **kw)  # fmt: skip
    vit.norm = nn.Identity()
    with torch.no_grad():  # timm zero-initialises some of these; random values test that each is used right
        for t in (vit.pos_embed, vit.cls_token, getattr(vit, "reg_token", None)):
            if t is not None:
                t.normal_(0, 0.5)
    return vit


def _adapter(vit: nn.Module, **kw) -> ViTAdapter:
    return ViTAdapter(vit, interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]], conv_inplane=8,
                      deform_num_heads=2, **kw)  # fmt: skip


@pytest.mark.parametrize("name", FAMILIES)
def test_the_trunk_feeds_the_blocks_exactly_what_timm_does(name):
    """Tokens on the 1/14 grid of a non-square input, position embedding resampled as timm's dynamic-size
    forward does, prefix tokens carried through all blocks: bit for bit timm's forward_features."""
    vit = _dinov2(name, dynamic_img_size=True).eval()
    trunk = trunk_for(vit)
    assert isinstance(trunk, TimmPrefixViTTrunk) and trunk.patch_size == 14
    x = torch.randn(2, 3, 98, 126)
    with torch.no_grad():
        tokens, prefix, hw = trunk.embed(x)
        tokens, prefix = trunk.run_blocks(tokens, prefix, 0, 3, hw, checkpoint=False)
        want = vit.forward_features(x)
    assert hw == (7, 9) and prefix.shape[1] == vit.num_prefix_tokens
    torch.testing.assert_close(torch.cat([prefix, tokens], 1), want, atol=0, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_adapter_on_patch14_gives_the_stride_4_to_32_pyramid_and_trains_every_part(name):
    vit = _dinov2(name)
    model = _adapter(vit)
    outs = model(torch.randn(1, 3, 224, 160))  # 16 x 11 ViT tokens, adapter maps at 1/8, 1/16, 1/32
    assert [tuple(o.shape[-2:]) for o in outs] == [(56, 40), (28, 20), (14, 10), (7, 5)]
    sum(o.pow(2).mean() for o in outs).backward()
    assert vit.patch_embed.proj.weight.shape[-1] == 14  # the pretrained kernel, not resampled
    grads = {"cls_token": vit.cls_token.grad, "layer scale": vit.blocks[0].ls1.gamma.grad,
             "injector": model.interactions[0].injector.gamma.grad}  # fmt: skip
    if getattr(vit, "reg_token", None) is not None:
        grads["register tokens"] = vit.reg_token.grad
    for what, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, what


def test_patch16_without_registers_keeps_the_official_trunk():
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=2)
    assert isinstance(trunk_for(vit), TimmViTTrunk)


def test_original_dinov2_layout_with_registers_loads(tmp_path):
    """DINOv2's own .pth key names (register_tokens, a pos_embed with the cls slot, mask_token) load into the timm
    model through timm's converter, without resampling the patch kernel, and the report names no missing key."""
    from adapterctl.models.pretrained import load_vit_weights

    src = _dinov2("vit_small_patch14_reg4_dinov2")
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    p0 = torch.randn(1, 1, 64)
    original = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    original.update(register_tokens=sd["reg_token"], cls_token=sd["cls_token"] - p0,
                    pos_embed=torch.cat([p0, sd["pos_embed"]], 1), mask_token=torch.zeros(1, 64))  # fmt: skip
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(original, path)
    dst = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=70, embed_dim=64, depth=4,
                            num_heads=2, num_classes=0)  # fmt: skip
    dst.norm = nn.Identity()
    report = load_vit_weights(dst, path)
    assert not report.missing, report
    for key, value in sd.items():
        torch.testing.assert_close(dst.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)


def test_frozen_vit_trains_the_adapter_only_and_computes_the_vits_own_features():
    vit = _dinov2("vit_small_patch14_reg4_dinov2")
    model = _adapter(vit, freeze_vit=True).train()
    assert not vit.training  # eval mode kept: no drop path in the frozen ViT
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("vit.") or ".injector." in n for n in trainable)
    outs = model(torch.randn(2, 3, 224, 224))
    sum(o.pow(2).mean() for o in outs).backward()
    assert all(p.grad is None for p in vit.parameters())
    assert model.interactions[-1].extractor.attn.value_proj.weight.grad.abs().sum() > 0
    assert model.spm.stem[0].weight.grad.abs().sum() > 0

    from adapterctl.engine.optim import param_groups

    names = {n for g in param_groups(model, 1e-4, 0.05) for n in g["names"]}
    assert names == trainable  # the optimizer holds no frozen parameter


def test_frozen_vit_under_bf16_saves_activation_memory():
    """Tensors kept for backward (the activation memory of a step) with the ViT trainable vs frozen (bf16)."""

    def saved_bytes(model):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = model(torch.randn(2, 3, 224, 224))
        sum(o.mean() for o in outs).backward()
        return total

    full = saved_bytes(_adapter(_dinov2("vit_small_patch14_dinov2")).train())
    frozen = saved_bytes(_adapter(_dinov2("vit_small_patch14_dinov2"), freeze_vit=True,
                                  freeze_vit_dtype="bfloat16").train())  # fmt: skip
    assert frozen < 0.8 * full, (frozen, full)
