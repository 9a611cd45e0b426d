"""Mask2Former head against the official mmseg_custom head (fixture ``official_mask2former_a.pt``,
mask2former_README.md: forward §5, matching and losses §4, inference §7, tolerances §8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapterctl.models.heads.mask2former import Mask2FormerHead
from adapterctl.models.heads.mask2former_loss import (
    PointSampler,
    ReplayPoints,
    hungarian,
    mask2former_losses,
    to_mask,
)

from .conftest import FIXTURES


@pytest.fixture(scope="module")
def fx() -> dict:
    return torch.load(FIXTURES / "official_mask2former_a.pt", map_location="cpu", weights_only=True)


def _head(fx: dict, in_channels: int | None = None) -> Mask2FormerHead:
    dh = fx["config"]["decode_head"]
    head = Mask2FormerHead(
        [in_channels] * 4 if in_channels else dh["in_channels"],
        num_classes=dh["num_things_classes"] + dh["num_stuff_classes"],
        feat_channels=dh["feat_channels"],
        num_queries=dh["num_queries"],
        num_heads=dh["transformer_decoder"]["transformerlayers"]["attn_cfgs"]["num_heads"],
        ffn_channels=dh["transformer_decoder"]["transformerlayers"]["feedforward_channels"],
        num_points=fx["train_cfg"]["num_points"],
    )
    if in_channels:
        return head
    weights = {k.removeprefix("decode_head."): v for k, v in fx["state_dict"].items()}
    ours = head.state_dict()
    assert sorted(weights) == sorted(ours)  # the official names, all 292 of them, and nothing else
    assert all(ours[k].shape == v.shape for k, v in weights.items())
    head.load_state_dict(weights, strict=True)
    return head.eval()


@pytest.fixture(scope="module")
def run(fx):
    head = _head(fx)
    with torch.no_grad():
        out = head(fx["feats"])
    return head, out


def _official_name(key: str) -> str:  # loss_cls.d3 -> d3.loss_cls
    name, _, layer = key.partition(".")
    return f"{layer}.{name}" if layer else name


def test_pixel_decoder_matches(fx, run):
    _, out = run
    torch.testing.assert_close(out["mask_features"], fx["mask_features"], atol=1e-4, rtol=0)
    for ours, want in zip(out["memories"], fx["multi_scale_memorys"], strict=True):
        torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["encoder_memory"].transpose(0, 1), fx["encoder_memory"], atol=1e-4, rtol=0)


def test_all_ten_predictions_and_every_attention_mask_match(fx, run):
    _, out = run
    assert out["cls"].shape == fx["all_cls_scores"].shape and out["masks"].shape == fx["all_mask_preds"].shape
    torch.testing.assert_close(out["cls"], fx["all_cls_scores"], atol=1e-3, rtol=0)
    torch.testing.assert_close(out["masks"], fx["all_mask_preds"], atol=1e-3, rtol=0)
    assert len(out["attn_masks"]) == 9
    for layer, (ours, want) in enumerate(zip(out["attn_masks"], fx["attn_masks"], strict=True)):
        assert torch.equal(ours, want), f"decoder layer {layer}"
    # the fixture has fully blocked rows: without the fix they would make NaN
    assert any(bool(raw.all(-1).any()) for raw in fx["attn_masks_raw"])
    assert torch.isfinite(out["masks"]).all()


def test_to_mask_targets(fx):
    labels, masks = to_mask(fx["gt_semantic_seg"][:, 0])
    for b in range(2):
        assert torch.equal(labels[b], fx["gt_labels"][b])
        assert torch.equal(masks[b].to(torch.uint8), fx["gt_masks"][b])


def test_matching_costs_and_assignment(fx, run):
    head, out = run
    labels, masks = to_mask(fx["gt_semantic_seg"][:, 0])
    record: dict = {}
    with torch.no_grad():
        mask2former_losses(head, out, labels, masks, ReplayPoints(fx["match_points"], fx["loss_points"]), record)
    for layer in range(10):
        for b in range(2):
            costs = record["costs"][layer][b]
            torch.testing.assert_close(costs.total, fx["cost_matrices"][layer][b], atol=1e-4, rtol=0)
            torch.testing.assert_close(costs.cls, fx["cost_cls"][layer][b], atol=1e-4, rtol=0)
            torch.testing.assert_close(costs.mask, fx["cost_mask"][layer][b], atol=1e-4, rtol=0)
            torch.testing.assert_close(costs.dice, fx["cost_dice"][layer][b], atol=1e-4, rtol=0)
            assert torch.equal(record["query_inds"][layer][b], fx["matched_query_inds"][layer][b])
            assert torch.equal(record["gt_inds"][layer][b], fx["matched_gt_inds"][layer][b])
    assert torch.equal(torch.stack(record["class_targets"]), fx["class_targets"])
    assert [int(n) for n in record["num_total_masks"]] == fx["num_total_masks"]


def test_losses_with_the_stored_points(fx, run):
    head, out = run
    labels, masks = to_mask(fx["gt_semantic_seg"][:, 0])
    with torch.no_grad():
        losses = mask2former_losses(head, out, labels, masks, ReplayPoints(fx["match_points"], fx["loss_points"]))
    assert sorted(_official_name(k) for k in losses) == sorted(fx["losses"])
    assert all(k.startswith("loss_") for k in losses)  # summed by the training loop
    for key, value in losses.items():
        torch.testing.assert_close(value, fx["losses"][_official_name(key)].reshape(()), rtol=1e-5, atol=0)
    torch.testing.assert_close(sum(losses.values()), fx["loss_total"], rtol=1e-5, atol=0)


def test_losses_from_the_seed_make_the_official_draws(fx, run):
    """After torch.manual_seed(loss_seed) the default sampler makes the official 40 torch.rand calls."""
    head, out = run
    labels = fx["gt_semantic_seg"][:, 0]
    torch.manual_seed(fx["loss_seed"])
    with torch.no_grad():
        losses = head.loss(out, labels)
    for key, value in losses.items():
        torch.testing.assert_close(value, fx["losses"][_official_name(key)].reshape(()), rtol=1e-5, atol=0)


def test_importance_sampler_picks_the_stored_points(fx):

    class StoredCandidates(PointSampler):
        def _rand(self, *shape, device):
            if shape[1] == fx["loss_points_oversampled_last"].shape[1]:
                return fx["loss_points_oversampled_last"]
            return fx["loss_points"][9][:, 1176:]

    # the last prediction's matched masks in the official order: image 0's queries ascending, then image 1's; the
    # official logits, since the top-k boundary margin (3e-5) is below our forward's difference
    rows = [fx["all_mask_preds"][9, b, fx["matched_query_inds"][9][b]] for b in range(2)]
    logits = torch.cat(rows).unsqueeze(1)
    pts = StoredCandidates().loss_points(9, logits, 1568, 3.0, 0.75)
    torch.testing.assert_close(pts, fx["loss_points"][9], atol=0, rtol=0)


def test_generator_makes_losses_reproducible_without_the_global_rng(fx, run):
    head, out = run
    labels = fx["gt_semantic_seg"][:, 0]
    with torch.no_grad():
        state = torch.get_rng_state()
        a = head.loss(out, labels, PointSampler(torch.Generator().manual_seed(3)))
        assert torch.equal(torch.get_rng_state(), state)  # the global generator was not touched
        b = head.loss(out, labels, PointSampler(torch.Generator().manual_seed(3)))
        c = head.loss(out, labels, PointSampler(torch.Generator().manual_seed(4)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


class _Feats(nn.Module):
    """A backbone that returns the fixture's maps (as the official harness did)."""

    def __init__(self, feats):
        super().__init__()
        self.feats = feats
        self.feature_info = [dict(num_chs=32, reduction=s) for s in (4, 8, 16, 32)]

    def forward(self, x):
        return self.feats


def test_semantic_inference_through_the_segmentor(fx, run):
    from adapterctl.models.segmentor import EncoderDecoder

    head, out = run
    torch.testing.assert_close(head.semantic_scores(out), fx["seg_mask"], atol=1e-4, rtol=0)
    seg = EncoderDecoder(_Feats(fx["feats"]), head, test_mode="slide", crop_size=(896, 896), stride=(512, 512))
    images = torch.zeros(2, 3, 128, 128)
    logits = seg.predict(images)
    torch.testing.assert_close(logits, fx["seg_logits"], atol=1e-4, rtol=0)
    differ = int((logits.softmax(1).argmax(1) != fx["seg_pred"]).sum())
    assert differ <= 4  # the README's near-tie pixels (top-2 gap below 1e-5)


def test_hungarian_survives_non_finite_costs():
    cost = torch.tensor([[float("nan"), 1.0], [0.5, float("inf")], [2.0, -float("inf")]])
    rows, cols = hungarian(cost)
    assert rows.tolist() == [1, 2] and cols.tolist() == [0, 1]


def _small_head(**kw) -> Mask2FormerHead:
    return Mask2FormerHead(
        [16, 24, 32, 40], num_classes=5, feat_channels=32, num_queries=6, num_heads=4, ffn_channels=48,
        num_points=64, **kw,
    )  # fmt: skip


def _feats(b=2, s=64, requires_grad=False):
    torch.manual_seed(0)
    return [
        torch.randn(b, c, s // r, s // r, requires_grad=requires_grad)
        for c, r in zip((16, 24, 32, 40), (4, 8, 16, 32), strict=True)
    ]


def test_training_backward_reaches_inputs_and_queries():
    head = _small_head().train()
    feats = _feats(requires_grad=True)
    labels = torch.randint(0, 5, (2, 64, 64))
    labels[:, :8] = 255
    losses = head.loss(head(feats), labels)
    assert len(losses) == 30
    sum(losses.values()).backward()
    assert all(f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0 for f in feats)
    for name in ("query_feat.weight", "query_embed.weight", "level_embed.weight", "cls_embed.weight"):
        assert head.get_submodule(name.rsplit(".", 1)[0]).weight.grad.abs().sum() > 0, name


def test_images_without_labels_train():
    """An image whose pixels are all ignored has no masks; a batch with none at all still backpropagates."""
    head = _small_head().train()
    feats = _feats()
    labels = torch.randint(0, 5, (2, 64, 64))
    labels[1] = 255
    losses = head.loss(head(feats), labels)
    assert all(torch.isfinite(v) for v in losses.values())
    labels[:] = 255
    losses = head.loss(head(feats), labels)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() == 0.0 and losses["loss_cls"].item() > 0
    sum(losses.values()).backward()


def test_official_layer_id_map_puts_the_head_embeddings_in_layer_zero():
    from adapterctl.engine.optim import layer_id

    for name in ("query_embed", "query_feat", "level_embed", "cls_embed", "mask_embed.0"):
        assert layer_id(f"decode_head.{name}.weight", 26) == 0
    assert layer_id("decode_head.pixel_decoder.level_encoding.weight", 26) == 25
    assert layer_id("decode_head.transformer_decoder.layers.0.norms.0.weight", 26) == 25


def test_an_official_mask2former_beit_checkpoint_in_a_release_zip_converts_and_runs(tmp_path):
    """A full official-layout BEiT-Adapter + Mask2Former checkpoint (the BEiT fixture's backbone, the Mask2Former
    fixture's head; the five input-projection weights resized to the 64-d backbone), packed as the release packs
    it (a .zip holding one .pth): convert reads the head's shape off the keys, and the file alone rebuilds a model
    whose backbone and head give the same numbers as the pieces."""
    import zipfile

    from PIL import Image
    from typer.testing import CliRunner

    from adapterctl.cli import app
    from adapterctl.models.build import load_model_from_checkpoint

    beit = torch.load(FIXTURES / "official_beit_adapter_a.pt", map_location="cpu", weights_only=True)
    m2f = torch.load(FIXTURES / "official_mask2former_a.pt", map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    head = {}
    for key, value in m2f["state_dict"].items():
        if key.endswith(("input_convs.0.conv.weight", "input_convs.1.conv.weight", "input_convs.2.conv.weight",
                         "lateral_convs.0.conv.weight")):  # fmt: skip
            value = torch.randn(value.shape[0], 64, 1, 1, generator=gen) * 0.1
        head[key] = value
    pth = tmp_path / "mask2former_beit_adapter_tiny_128.pth"
    torch.save({"state_dict": {**beit["state_dict_mmseg"], **head}, "meta": {"note": "official layout"}}, pth)
    src = tmp_path / "mask2former_beit_adapter_tiny_128.zip"
    with zipfile.ZipFile(src, "w") as archive:
        archive.write(pth, f"mask2former_beit_adapter_tiny_128/{pth.name}")
        archive.writestr("mask2former_beit_adapter_tiny_128/log.json", "{}")
    c = beit["config"]
    size = [
        f"model.embed_dim={c['embed_dim']}", f"model.depth={c['depth']}", f"model.num_heads={c['num_heads']}",
        f"model.init_values={c['init_values']}", "model.drop_path_rate=0.0",
        "model.interaction_indexes=[[0,0],[1,1],[2,2],[3,3]]", f"model.conv_inplane={c['conv_inplane']}",
        f"model.deform_num_heads={c['deform_num_heads']}", "model.with_cp=false", "head.decode.num_points=1568",
        "data.test.scale=[512,128]", "data.test.mode=slide", "data.test.crop_size=[128,128]",
        "data.test.stride=[96,96]",
    ]  # fmt: skip
    dst = tmp_path / "m2f.safetensors"
    result = CliRunner().invoke(app, ["convert", str(src), str(dst), "--model", "beit_adapter_l", *size])
    assert result.exit_code == 0, result.output
    assert "Mask2Former" in result.output and "keys not converted" not in result.output
    model, cfg, _ = load_model_from_checkpoint(dst)
    assert cfg.head.name == "mask2former" and cfg.model.img_size == 128  # read off the rel-pos table
    assert (cfg.head.num_classes, cfg.head.decode.num_queries, cfg.head.decode.num_heads) == (7, 10, 4)
    model.eval()
    with torch.no_grad():
        feats = model.backbone(beit["input"])
        for ours, want in zip(feats, beit["outputs"], strict=True):
            torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)
        reference = _head(m2f, in_channels=64).eval()
        reference.load_state_dict({k.removeprefix("decode_head."): v for k, v in head.items()})
        torch.testing.assert_close(
            model.decode_head.semantic_scores(model.decode_head(feats)),
            reference.semantic_scores(reference(feats)),
            atol=1e-5, rtol=0,
        )  # fmt: skip
    image = tmp_path / "photo.png"
    Image.fromarray((torch.rand(150, 200, 3) * 255).byte().numpy()).save(image)
    pred = CliRunner().invoke(
        app, ["predict", str(dst), str(image), "--out", str(tmp_path / "pred"), "--device", "cpu"]
    )
    assert pred.exit_code == 0, pred.output
    assert Image.open(tmp_path / "pred" / "photo.png").size == (200, 150)


def test_a_zip_without_one_checkpoint_is_refused(tmp_path):
    import zipfile

    from adapterctl.errors import CheckpointError
    from adapterctl.models.official import load_checkpoint_file

    src = tmp_path / "release.zip"
    with zipfile.ZipFile(src, "w") as archive:
        archive.writestr("release/README.txt", "no weights here")
    with pytest.raises(CheckpointError, match="no checkpoint files.*README.txt"):
        load_checkpoint_file(str(src))


class _FixedWindow(nn.Module):
    """A backbone that, like BEiT, takes only its own input size (64 x 64)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.ModuleList(nn.Conv2d(3, 8, s, stride=s) for s in (4, 8, 16, 32))
        self.feature_info = [dict(num_chs=8, reduction=s) for s in (4, 8, 16, 32)]

    def forward(self, x):
        if tuple(x.shape[-2:]) != (64, 64):
            raise ValueError(f"input {tuple(x.shape[-2:])} is not the 64 x 64 window")
        return [conv(x) for conv in self.convs]


class _Linear(nn.Module):
    num_classes = 3

    def __init__(self):
        super().__init__()
        self.conv_seg = nn.Conv2d(8, 3, 1)

    def forward(self, feats):
        return self.conv_seg(feats[0])

    def semantic_scores(self, out):
        return out


def test_multi_scale_pads_the_short_side_for_a_fixed_window_and_crops_it_off():
    """The 896 _ms protocol: each scale (and flip) is padded with black pixels up to the window and the padding is
    cut off the logits before they are resized and averaged."""
    from adapterctl.models.heads.common import resize
    from adapterctl.models.segmentor import EncoderDecoder

    kw = dict(test_mode="aug", crop_size=(64, 64), stride=(32, 32), aug_ratios=(0.5, 1.0), aug_flip=True,
              aug_mode="slide")  # fmt: skip
    images = torch.rand(1, 3, 64, 128) * 255
    plain = EncoderDecoder(_FixedWindow(), _Linear(), **kw).eval()
    with pytest.raises(ValueError, match="not the 64 x 64 window"):
        plain.predict(images)  # the 0.5 scale (32 x 64) is smaller than the window
    seg = EncoderDecoder(_FixedWindow(), _Linear(), pad_short_side=64, **kw).eval()
    probs = seg.predict(images)
    expected = 0
    for size in ((32, 64), (64, 128)):
        scaled = resize(images, size)
        for flip in (False, True):
            x = scaled.flip(-1) if flip else scaled
            padded = torch.nn.functional.pad(x, (0, 64 - size[1], 0, 64 - size[0])) if size[0] < 64 else x
            logits = seg.slide_logits(padded)[..., : size[0], : size[1]]
            logits = logits.flip(-1) if flip else logits
            expected = expected + resize(logits, (64, 128)).softmax(1)
    torch.testing.assert_close(probs, expected / 4)


TINY_M2F = [
    "head=mask2former", "head.decode.feat_channels=32", "head.decode.num_heads=4", "head.decode.ffn_channels=64",
    "head.decode.num_queries=8", "head.decode.num_points=256", "head.decode.with_cp=true",
]  # fmt: skip


def test_train_under_bf16_then_eval_the_checkpoint(synth_seg, tmp_path):
    """`adapterctl train head=mask2former` under bf16 autocast (the losses and matching run in fp32), with the
    FFN checkpointing on; the checkpoint alone evaluates."""
    import json

    from typer.testing import CliRunner

    from adapterctl.cli import app

    from .conftest import tiny_train_overrides

    out = tmp_path / "run"
    base = [o for o in tiny_train_overrides(synth_seg, out, max_iters=2, amp="bf16") if not o.startswith("head.")]
    result = CliRunner().invoke(app, ["train", *base, *TINY_M2F])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "train/loss" in r]
    assert len(losses) == 2 and all(r["train/loss"] > 0 for r in losses)
    assert sum(k.startswith("train/loss_") for k in losses[0]) == 30
    assert "loss_cls.d0" not in result.output  # the console line shows the final prediction's terms only
    ev = CliRunner().invoke(
        app, ["eval", f"ckpt={out / 'checkpoints' / 'final.pt'}", f"paths.output_dir={tmp_path / 'e'}"]
    )
    assert ev.exit_code == 0, ev.output
    assert 0.0 <= json.loads((tmp_path / "e" / "metrics.json").read_text())["mIoU"] <= 100.0


def test_beit_mask2former_optimizer_groups_follow_the_official_constructor():
    """Layer decay 0.90 over 24 blocks (26 ids): the head's embeddings in layer 0 with the patch embedding, block
    i at 0.9^(24 - i), the adapter and the rest of the head at 1; no decay for 1-D tensors and biases only."""
    from adapterctl.config import compose
    from adapterctl.engine.optim import param_groups
    from adapterctl.models.build import build_model

    cfg = compose("train", ["experiment=ade20k_mask2former_beit_adapter_l_640"])
    with torch.device("meta"):
        model = build_model(cfg)
    groups = param_groups(model, lr=2e-5, weight_decay=0.05, layer_decay_rate=0.9)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert scale["decode_head.query_embed.weight"] == pytest.approx(0.9**25)
    assert scale["decode_head.mask_embed.4.weight"] == pytest.approx(0.9**25)
    assert scale["backbone.vit.patch_embed.proj.weight"] == pytest.approx(0.9**25)
    assert scale["backbone.vit.blocks.0.attn.qkv.weight"] == pytest.approx(0.9**24)
    assert scale["backbone.vit.blocks.23.mlp.fc1.weight"] == pytest.approx(0.9)
    assert scale["decode_head.pixel_decoder.mask_feature.weight"] == 1.0
    assert scale["decode_head.transformer_decoder.layers.8.attentions.0.attn.in_proj_weight"] == 1.0
    assert decay["backbone.vit.blocks.0.attn.relative_position_bias_table"] == 0.05  # 2-D: decayed, as official
    assert decay["backbone.vit.blocks.0.gamma_1"] == 0.0 and decay["backbone.vit.blocks.0.attn.q_bias"] == 0.0
    assert decay["decode_head.query_feat.weight"] == 0.05


def test_the_mask2former_recipe_optimizer():
    from adapterctl.config import compose
    from adapterctl.engine.optim import param_groups
    from adapterctl.models.build import build_model

    from .conftest import TINY_MODEL

    model_args = [o for o in TINY_MODEL if not o.startswith("head.")]
    cfg = compose("train", [*model_args, *TINY_M2F, "optim=adamw_mask2former"])
    assert cfg.optim.grad_clip == 0.01
    o = cfg.optim
    groups = param_groups(build_model(cfg), float(o.lr), float(o.weight_decay), float(o.layer_decay_rate),
                          no_decay_keys=list(o.no_decay_keys), lr_mult=dict(o.lr_mult))  # fmt: skip
    lr = {n: g["lr"] for g in groups for n in g["names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert lr["backbone.vit.blocks.0.attn.qkv.weight"] == pytest.approx(1e-5)
    assert lr["backbone.spm.stem.0.weight"] == pytest.approx(1e-5)
    assert lr["decode_head.query_embed.weight"] == pytest.approx(1e-4)
    for name in ("decode_head.query_embed.weight", "decode_head.query_feat.weight", "decode_head.level_embed.weight",
                 "decode_head.pixel_decoder.level_encoding.weight", "backbone.vit.pos_embed"):  # fmt: skip
        assert decay[name] == 0.0, name
    assert decay["decode_head.pixel_decoder.mask_feature.weight"] == 0.05


def test_convert_reads_the_head_shape_off_the_keys():
    """Widths, queries, heads, depths, classes and a pixel-decoder FFN that differs (the BEiT-B rows)."""
    from adapterctl.models.convert import _head_overrides

    head = Mask2FormerHead([48] * 4, num_classes=11, feat_channels=64, num_queries=12, num_heads=8,
                           ffn_channels=96, enc_ffn_channels=40, enc_layers=2, dec_layers=3)  # fmt: skip
    full = {f"decode_head.{k}": v for k, v in head.state_dict().items()}
    assert set(_head_overrides(full)) == {
        "head=mask2former", "head.num_classes=11", "data.num_classes=11", "head.decode.feat_channels=64",
        "head.decode.num_queries=12", "head.decode.enc_layers=2", "head.decode.dec_layers=3",
        "head.decode.num_heads=8", "head.decode.ffn_channels=96", "head.decode.enc_ffn_channels=40",
    }  # fmt: skip
