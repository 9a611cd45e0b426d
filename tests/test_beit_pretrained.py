"""BEiT weights from local files: the official rel-pos table resize (fixture) and the released key layouts."""

from __future__ import annotations

import pytest
import torch
from timm.models.beit import Beit

from adapterctl.models.beit_adapter import build_beit_adapter
from adapterctl.models.beit_pretrained import resize_rel_pos_table
from adapterctl.models.pretrained import load_pretrained

from .conftest import FIXTURES


@pytest.fixture(scope="module")
def resize_fx() -> dict:
    return torch.load(FIXTURES / "official_beit_relpos_resize.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize(
    "case", ["src14_dst8", "src14_dst14", "src14_dst32", "src14_dst40", "src14_dst56", "src24_dst40"]
)
def test_rel_pos_table_resize_is_the_official_one_bit_for_bit(resize_fx, case):
    c = resize_fx["cases"][case]
    out = resize_rel_pos_table(c["input"], tuple(c["dst_window"]))
    assert out.shape == c["output"].shape
    assert torch.equal(out, c["output"]), float((out - c["output"]).abs().max())
    assert torch.equal(out[-3:], c["input"][-3:])  # the cls rows are kept


def test_a_non_square_window_is_refused_as_the_official_loader_refuses_it(resize_fx):
    assert "NotImplementedError" in resize_fx["errors"]["src14_dst6x10"]
    with pytest.raises(NotImplementedError, match="square windows only; got 6x10"):
        resize_rel_pos_table(resize_fx["cases"]["src14_dst8"]["input"], (6, 10))


def _small_beit(img_size: int) -> Beit:
    return Beit(
        img_size=img_size, patch_size=16, embed_dim=32, depth=4, num_heads=4, use_abs_pos_emb=False,
        use_rel_pos_bias=True, init_values=0.1, num_classes=10,
    )  # fmt: skip


@pytest.mark.parametrize("shared", [False, True])
def test_a_released_layout_beit_file_loads_with_tables_resized(tmp_path, resize_fx, shared):
    torch.manual_seed(0)
    source = _small_beit(224)  # the pretraining window: 14
    sd = {k: v for k, v in source.state_dict().items()}
    if shared:  # BEiT pt22k files: one table for all blocks
        for i in range(4):
            sd.pop(f"blocks.{i}.attn.relative_position_bias_table")
        sd["rel_pos_bias.relative_position_bias_table"] = resize_fx["cases"]["src14_dst8"]["input"]
    path = tmp_path / "beit_small_patch16_224_pt22k_ft22k.pth"
    torch.save({"model": sd}, path)
    model = build_beit_adapter(
        img_size=128, embed_dim=32, depth=4, num_heads=4, interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]],
        conv_inplane=8, deform_num_heads=4, init_values=0.1,
    )  # fmt: skip
    (report,) = load_pretrained(model, path)
    assert not report.missing and {"head.weight", "head.bias"} <= set(report.unexpected)
    for i in range(4):
        table = model.vit.blocks[i].attn.relative_position_bias_table
        src = (
            resize_fx["cases"]["src14_dst8"]["input"]
            if shared
            else source.blocks[i].attn.relative_position_bias_table.detach()
        )
        assert table.shape == (15 * 15 + 3, 4)
        assert torch.equal(table.detach(), resize_rel_pos_table(src, (8, 8)))
    if shared:  # as the fixture's shared case: every block gets the official resize of the one table
        assert torch.equal(
            model.vit.blocks[3].attn.relative_position_bias_table.detach(), resize_fx["cases"]["src14_dst8"]["output"]
        )
    torch.testing.assert_close(model.vit.blocks[2].mlp.fc1.weight, source.blocks[2].mlp.fc1.weight.detach())
    torch.testing.assert_close(model.vit.cls_token, source.cls_token.detach())
    with torch.no_grad():
        outs = model.eval()(torch.randn(1, 3, 128, 128))
    assert [o.shape[-1] for o in outs] == [32, 16, 8, 4]
