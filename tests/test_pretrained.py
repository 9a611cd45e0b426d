"""Loading plain-ViT weights from local files: timm .pth / .safetensors and JAX .npz layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from adapterctl.models.pretrained import load_vit_weights
from adapterctl.models.zoo import build_vit_adapter

DIM, DEPTH, HEADS = 64, 2, 2


def _source_vit(img_size: int) -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=img_size, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=10
    )
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_()
    return vit


def _adapter() -> torch.nn.Module:
    return build_vit_adapter(
        img_size=32,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        conv_inplane=8,
        deform_num_heads=2,
        interaction_indexes=[[0, 0], [1, 1]],
        vit_feature_mode="final",
    )


def _write_npz(vit: VisionTransformer, path) -> None:
    """The Google JAX/Flax layout that timm reads (the inverse of timm's _load_weights)."""
    hd = DIM // HEADS
    w = {
        "embedding/kernel": vit.patch_embed.proj.weight.detach().permute(2, 3, 1, 0).numpy(),
        "embedding/bias": vit.patch_embed.proj.bias.detach().numpy(),
        "cls": vit.cls_token.detach().numpy(),
        "Transformer/posembed_input/pos_embedding": vit.pos_embed.detach().numpy(),
        "Transformer/encoder_norm/scale": vit.norm.weight.detach().numpy(),
        "Transformer/encoder_norm/bias": vit.norm.bias.detach().numpy(),
        "head/kernel": vit.head.weight.detach().T.numpy(),
        "head/bias": vit.head.bias.detach().numpy(),
    }
    for i, blk in enumerate(vit.blocks):
        p = f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        qkv_w = blk.attn.qkv.weight.detach().view(3, DIM, DIM)
        qkv_b = blk.attn.qkv.bias.detach().view(3, HEADS, hd)
        for j, name in enumerate(("query", "key", "value")):
            w[f"{mha}{name}/kernel"] = qkv_w[j].T.reshape(DIM, HEADS, hd).numpy()
            w[f"{mha}{name}/bias"] = qkv_b[j].numpy()
        w[f"{mha}out/kernel"] = blk.attn.proj.weight.detach().view(DIM, HEADS, hd).permute(1, 2, 0).numpy()
        w[f"{mha}out/bias"] = blk.attn.proj.bias.detach().numpy()
        for ln, norm in (("LayerNorm_0", blk.norm1), ("LayerNorm_2", blk.norm2)):
            w[f"{p}{ln}/scale"] = norm.weight.detach().numpy()
            w[f"{p}{ln}/bias"] = norm.bias.detach().numpy()
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"] = fc.weight.detach().T.numpy()
            w[f"{p}MlpBlock_3/Dense_{r}/bias"] = fc.bias.detach().numpy()
    np.savez(path, **w)


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "npz", "pth-wrapped"])
def test_round_trip_loads_every_vit_tensor(tmp_path, fmt):
    src = _source_vit(img_size=32)  # same 2x2 grid as the model: no resampling
    path = tmp_path / f"w.{fmt.split('-')[0]}"
    if fmt == "pth":
        torch.save(src.state_dict(), path)
    elif fmt == "pth-wrapped":
        torch.save({"model": src.state_dict(), "epoch": 3}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(src.state_dict(), str(path))
    else:
        _write_npz(src, path)
    model = _adapter()
    report = load_vit_weights(model.vit, path)
    src_sd = src.state_dict()
    for key, value in model.vit.state_dict().items():
        if key.endswith("ls1.gamma") or key.endswith("ls2.gamma"):
            assert torch.equal(value, torch.ones_like(value)), key  # not in DeiT/AugReg weights: stays at 1
            continue
        torch.testing.assert_close(value, src_sd[key], atol=1e-6, rtol=1e-6, msg=key)
    assert sorted(report.missing) == sorted(f"blocks.{i}.ls{j}.gamma" for i in range(DEPTH) for j in (1, 2))
    assert {"cls_token", "norm.weight"} <= set(report.unexpected)  # (timm drops the npz classifier itself)


def test_position_embedding_is_resized_to_the_pretrain_grid(tmp_path):
    src = _source_vit(img_size=64)  # a 4x4 grid into the model's 2x2
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = _adapter()
    load_vit_weights(model.vit, tmp_path / "w.pth")
    assert model.vit.pos_embed.shape == (1, 1 + 4, DIM)
    torch.testing.assert_close(model.vit.pos_embed[:, 0], src.pos_embed[:, 0].detach())  # cls slot kept


def test_missing_file_and_garbage_are_clear_errors(tmp_path):
    model = _adapter()
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_vit_weights(model.vit, tmp_path / "nothere.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        load_vit_weights(model.vit, bad)


def test_build_reads_no_file_and_load_pretrained_fills_every_adapter(tmp_path):
    """The builder does no file I/O (a checkpoint alone rebuilds a model); ``load_pretrained`` is the one step
    that reads a run's initial ViT weights, into whatever model holds the ViT-Adapter."""
    from omegaconf import OmegaConf

    from adapterctl.models.build import build_backbone
    from adapterctl.models.pretrained import load_pretrained

    src = _source_vit(img_size=32)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    cfg = OmegaConf.create(
        {
            "family": "vit_adapter",
            "pretrained": str(tmp_path / "gone.pth"),  # not there: building must not look
            "img_size": 32,
            "embed_dim": DIM,
            "depth": DEPTH,
            "num_heads": HEADS,
            "conv_inplane": 8,
            "deform_num_heads": 2,
            "interaction_indexes": [[0, 0], [1, 1]],
            "vit_feature_mode": "final",
        }
    )
    backbone = build_backbone(cfg)
    assert not torch.equal(backbone.vit.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    holder = torch.nn.Sequential(torch.nn.Identity(), backbone)
    (report,) = load_pretrained(holder, tmp_path / "w.pth")
    assert report.loaded > 0
    torch.testing.assert_close(backbone.vit.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight.detach())
