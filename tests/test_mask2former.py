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


def _head(fx: dict) -> Mask2FormerHead:
    dh = fx["config"]["decode_head"]
    head = Mask2FormerHead(
        dh["in_channels"],
        num_classes=dh["num_things_classes"] + dh["num_stuff_classes"],
        feat_channels=dh["feat_channels"],
        num_queries=dh["num_queries"],
        num_heads=dh["transformer_decoder"]["transformerlayers"]["attn_cfgs"]["num_heads"],
        ffn_channels=dh["transformer_decoder"]["transformerlayers"]["feedforward_channels"],
        num_points=fx["train_cfg"]["num_points"],
    )
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
