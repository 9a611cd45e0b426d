"""The BEiT-Adapter detection copy (the official ``detection/mmdet_custom/models/backbones/base/beit.py`` that HTC++
BEiT-Adapter-L runs): windowed blocks with per-window relative-position tables and no cls token. No official
fixture exists for it; the blocks are checked against a line-by-line transcription of the official forward, the
weights against the official loader's rules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adapterctl.models.beit_adapter import build_from_config
from adapterctl.models.variants import beit_model_kwargs

TINY = dict(
    img_size=64, embed_dim=32, depth=4, num_heads=2, deform_num_heads=2, conv_inplane=8, mlp_ratio=4.0,
    qkv_bias=True, init_values=0.1, drop_path_rate=0.0, interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]],
)  # fmt: skip


def _official_block(block, x, h, w, ws):
    """The official detection Block + windowed Attention forward, transcribed (window_partition / reverse)."""
    attn = block.attn

    def attn_forward(x):
        b, n, c = x.shape
        qkv_bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
        qkv = F.linear(input=x, weight=attn.qkv.weight, bias=qkv_bias)
        qkv = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * attn.scale
        a = q @ k.transpose(-2, -1)
        bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(ws * ws, ws * ws, -1)
        a = (a + bias.permute(2, 0, 1).contiguous().unsqueeze(0)).softmax(dim=-1)
        return attn.proj((a @ v).transpose(1, 2).reshape(b, n, -1))

    def windowed(x):
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        h_, w_ = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
        x = F.pad(x, [0, 0, 0, w_ - w, 0, h_ - h])
        x = x.view(b, h_ // ws, ws, w_ // ws, ws, c).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)
        x = attn_forward(x.view(-1, ws * ws, c)).view(-1, ws, ws, c)
        bb = int(x.shape[0] / (h_ * w_ / ws / ws))
        x = x.view(bb, h_ // ws, w_ // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).contiguous().view(bb, h_, w_, -1)
        return x[:, :h, :w, :].reshape(b, h * w, c)

    x = x + block.gamma_1 * windowed(block.norm1(x))
    return x + block.gamma_2 * block.mlp(block.norm2(x))


def test_detection_layout_windows_every_block_and_drops_the_cls_token():
    kw = beit_model_kwargs("l", "detection")
    assert kw["window_attn"] == [True] * 24 and kw["vit_feature_mode"] == "final"
    assert [i for i, s in enumerate(kw["window_size"]) if s == 56] == [5, 11, 17, 23]
    assert set(kw["window_size"]) == {14, 56}
    with torch.device("meta"):
        model = build_from_config("l", "detection", img_size=224)
    tables = [b.attn.relative_position_bias_table.shape for b in model.trunk.vit.blocks]
    assert tables[0] == (27**2, 16) and tables[5] == (111**2, 16)  # no cls rows
    assert model.trunk.vit.cls_token is None and not any("cls_token" in k for k in model.state_dict())


@pytest.mark.parametrize(("hw", "windows"), [((10, 12), [3, 3, 3, 5]), ((8, 8), [4, 8, 2, 8])])
def test_windowed_blocks_equal_the_official_forward(hw, windows):
    """Padding (10x12 in windows of 3 and 5: zero tokens join the attention) and exact tilings."""
    torch.manual_seed(0)
    model = build_from_config(layout="detection", window_size=windows, **TINY).eval()
    trunk = model.trunk
    for block in trunk.vit.blocks:
        torch.nn.init.normal_(block.attn.relative_position_bias_table, std=0.5)
        torch.nn.init.normal_(block.attn.q_bias, std=0.2)
        torch.nn.init.normal_(block.attn.v_bias, std=0.2)
    images = torch.rand(2, 3, hw[0] * 16, hw[1] * 16)
    with torch.no_grad():
        tokens, prefix, got_hw = trunk.embed(images)
        assert got_hw == hw and prefix.shape[1] == 0
        ours, _ = trunk.run_blocks(tokens, prefix, 0, 3, hw, checkpoint=False)
        want = tokens
        for block, ws in zip(trunk.vit.blocks, windows, strict=True):
            want = _official_block(block, want, *hw, ws)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


def test_pretrained_tables_follow_the_detection_loader(tmp_path):
    """mmcv_custom (detection): the 3 cls rows dropped; a 14 window keeps the 27x27 grid, a 56 window gets the
    geometric resize of it; the relative-position index equals the official one."""
    from adapterctl.models.beit_pretrained import resize_rel_pos_table

    torch.manual_seed(0)
    model = build_from_config(layout="detection", window_size=[14, 14, 14, 56], **TINY)
    sd = {f"blocks.{i}.attn.relative_position_bias_table": torch.randn(27**2 + 3, 2) for i in range(4)}
    sd.update({f"blocks.{i}.norm1.weight": torch.rand(32) for i in range(4)})
    path = tmp_path / "beit.pth"
    torch.save({"model": sd}, path)
    report = model.trunk.load_pretrained(path)
    assert report.loaded == 8
    blocks = model.trunk.vit.blocks
    t0 = sd["blocks.0.attn.relative_position_bias_table"]
    assert torch.equal(blocks[0].attn.relative_position_bias_table.detach(), t0[:-3])
    t3 = sd["blocks.3.attn.relative_position_bias_table"]
    assert torch.equal(blocks[3].attn.relative_position_bias_table.detach(), resize_rel_pos_table(t3, (56, 56))[:-3])
    ws = 3  # the official index construction
    coords = torch.stack(torch.meshgrid([torch.arange(ws), torch.arange(ws)], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += ws - 1
    rel[:, :, 1] += ws - 1
    rel[:, :, 0] *= 2 * ws - 1
    from adapterctl.models.trunks_beit import _window_index

    assert torch.equal(_window_index(ws), rel.sum(-1))


def test_detection_copy_trains_at_any_size():
    model = build_from_config(layout="detection", window_size=[3, 3, 3, 5], **TINY)
    outs = model(torch.rand(1, 3, 160, 192))
    assert [tuple(o.shape[-2:]) for o in outs] == [(40, 48), (20, 24), (10, 12), (5, 6)]
    sum(o.pow(2).mean() for o in outs).backward()
    assert model.trunk.vit.blocks[3].attn.relative_position_bias_table.grad.abs().sum() > 0
