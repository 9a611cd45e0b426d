"""HTC++ (the ViT-Adapter config) against mmdet 2.22 (fixture official_htc_a.pt, cascade_htc_README.md §3-4,
tolerances §7), and soft-NMS against a literal transcription of mmcv's kernel."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch

from adapterctl.models.assign import ReplayChoice
from adapterctl.models.detector import AdapterHTC, HTCBackbone, convert_mmdet_htc
from adapterctl.models.htc import semantic_targets, soft_nms

from .conftest import FIXTURES
from .test_detector import _Maps, assert_official_detections


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURES / "official_htc_a.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model(fx):
    cfg = fx["config"]["model"]
    bh = cfg["roi_head"]["bbox_head"][0]
    neck0 = cfg["neck"][0]
    backbone = HTCBackbone(_Maps(fx["inputs"]), cfg["neck"][1]["out_channels"], num_heads=neck0["num_head"])
    net = AdapterHTC(
        backbone, fx["meta"]["num_classes"], image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0),
        conv_channels=bh["conv_out_channels"], fc_channels=bh["fc_out_channels"],
        semantic_classes=cfg["roi_head"]["semantic_head"]["num_classes"],
    )  # fmt: skip
    converted, left = convert_mmdet_htc(fx["state_dict"])
    assert left == []
    net.load_state_dict(converted, strict=True)  # all 140 official tensors, nothing else
    return net.eval()


def _hw(fx):
    return tuple(fx["meta"]["img_shape"])


def _targets(fx):
    return [{"boxes": fx["gt_bboxes"], "labels": fx["gt_labels"] + 1, "masks": fx["gt_masks"],
             "semantic": fx["gt_semantic_seg_full"]}]  # fmt: skip


def test_extra_attention_fpn_and_semantic_branch(fx, model):
    with torch.no_grad():
        maps = model.backbone.extra_attention(list(fx["inputs"]))
        torch.testing.assert_close(maps[-1], fx["extra_attention_out"], atol=1e-5, rtol=0)
        for a, b in zip(maps[:-1], fx["inputs"][:-1], strict=True):
            assert torch.equal(a, b)  # f1..f3 pass through
        feats = model.backbone(torch.zeros(1))
        for got, want in zip(feats.values(), fx["neck_outs"], strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        logits, with_sem = model.roi_heads.semantic(feats)
    # values reach 55 and 32: both this and the official float32 result lie ~6.5e-5 from a float64 evaluation
    torch.testing.assert_close(logits, fx["semantic_pred"], atol=1e-4, rtol=0)
    torch.testing.assert_close(with_sem["semantic"], fx["semantic_feat"], atol=1e-4, rtol=0)


def test_every_stage_on_the_stored_proposals(fx, model):
    with torch.no_grad():
        _, feats = model.roi_heads.semantic(model.backbone(torch.zeros(1)))
        stages = model.roi_heads.stage_outputs(feats, fx["proposals"][:, :4], _hw(fx))
    for ours, want in zip(stages, fx["stages"], strict=True):
        torch.testing.assert_close(ours["rois"], want["rois"], atol=1e-3, rtol=0)
        torch.testing.assert_close(ours["cls_score"], want["cls_score"], atol=1e-4, rtol=0)
        torch.testing.assert_close(ours["bbox_pred"], want["bbox_pred"], atol=1e-4, rtol=0)
    torch.testing.assert_close(sum(s["cls_score"] for s in stages) / 3.0, fx["final_cls_score"], atol=1e-4, rtol=0)


def test_end_to_end_soft_nms_detections_and_masks(fx, model):
    h, w = _hw(fx)
    with torch.no_grad():
        det = model([torch.zeros(3, h, w)])[0]
    assert_official_detections(det, fx, 75, max_pixels=32)  # §6: 32 pixels sit within 1e-5 of 0.5


def test_semantic_labels_are_the_padded_map_at_one_eighth(fx):
    full = fx["gt_semantic_seg_full"]
    assert torch.equal(semantic_targets([full], tuple(full.shape))[:, None], fx["gt_semantic_seg"])
    # a smaller image on a larger padded canvas: the padding is void (255)
    seg = semantic_targets([full[:100, :200]], (128, 256))
    assert seg.shape == (1, 16, 32) and bool((seg[0, 13:, :] == 255).all()) and bool((seg[0, :, 25:] == 255).all())
    with pytest.raises(ValueError, match="semantic"):
        semantic_targets([None], (128, 256))


def _train(model):
    net = copy.deepcopy(model).train()
    for m in net.modules():  # §2.3: DropPath / Dropout back in eval
        if not isinstance(m, AdapterHTC):
            m.training = m.training and not type(m).__name__.startswith(("DropPath", "Dropout"))
    return net


def test_interleaved_training_pass_gives_the_official_losses(fx, model):
    """RPN, semantic loss, the three stages with their second (mask-branch) sampling, and the total: once with the
    stored draws replayed, once from ``torch.manual_seed(loss_seed)`` through the default sampler."""
    want = fx["losses"]
    for replay in (True, False):
        net = _train(model)
        net.set_sampler(ReplayChoice([c["result"] for c in fx["train"]["random_choice_calls"]]) if replay else None)
        torch.manual_seed(fx["meta"]["loss_seed"])
        with torch.no_grad():
            losses = net([torch.zeros(3, *_hw(fx))], _targets(fx))
        torch.testing.assert_close(losses["loss_semantic_seg"], want["loss_semantic_seg"], rtol=1e-5, atol=0)
        torch.testing.assert_close(losses["loss_objectness"], sum(want["loss_rpn_cls"]), rtol=1e-5, atol=0)
        torch.testing.assert_close(losses["loss_rpn_box_reg"], sum(want["loss_rpn_bbox"]), rtol=1e-5, atol=0)
        for i in range(3):
            for key in ("loss_cls", "loss_bbox", "loss_mask", "acc"):
                got, ref = losses[f"{key}.s{i}"], want[f"s{i}.{key}"].reshape(())
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=0, msg=f"s{i}.{key}")
        total = sum(v for k, v in losses.items() if k.startswith("loss"))
        torch.testing.assert_close(total, fx["loss_total"].reshape(()), rtol=1e-5, atol=0)


def test_stage_sampling_and_mask_targets(fx, model):
    """Each stage's bbox-branch and mask-branch samples and the mask targets, from the stored training proposals."""
    t = fx["train"]
    heads = copy.deepcopy(model.roi_heads)
    heads.sampler = ReplayChoice([c["result"] for c in t["random_choice_calls"] if c["sampler"] != "rpn"])
    record: dict = {}
    with torch.no_grad():
        feats = OrderedDict(model.backbone(torch.zeros(1)))
        heads.losses(feats, [t["rpn"]["proposals"][:, :4]], [_hw(fx)], _targets(fx), record=record)
    for i in range(3):
        ours = record["stages"][i]
        torch.testing.assert_close(ours["rois"], t["bbox"][i]["rois"], atol=1e-3, rtol=0)
        assert torch.equal(ours["labels"], t["bbox"][i]["labels"])
        torch.testing.assert_close(ours["cls_score"], t["bbox"][i]["cls_score"], atol=1e-4, rtol=0)
        torch.testing.assert_close(ours["mask_rois"], t["mask"][i]["pos_rois"], atol=1e-3, rtol=0)
        assert torch.equal(ours["mask_targets"], t["mask"][i]["targets"])
    assert torch.equal(record["semantic_targets"][:, None], fx["gt_semantic_seg"])


def test_training_backward_reaches_every_branch(fx, model):
    torch.manual_seed(0)
    net = _train(model)
    losses = net([torch.zeros(3, *_hw(fx))], _targets(fx))
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    heads = net.roi_heads
    assert heads.semantic_head.conv_logits.weight.grad.abs().sum() > 0
    assert net.backbone.extra_attention.attn.qkv.weight.grad.abs().sum() > 0
    for s in range(3):
        assert heads.bbox_head[s].fc_reg.weight.grad.abs().sum() > 0
        assert heads.mask_head[s].conv_logits.weight.grad.abs().sum() > 0
    assert heads.mask_head[2].conv_res["conv"].weight.grad.abs().sum() > 0  # the information flow trains


def _soft_nms_literal(boxes, scores, thr, min_score):
    """mmcv 1.4.2 ``softnms_cpu`` (method linear, offset 0), transcribed loop for loop in float32."""
    b = boxes.clone().tolist()
    s = scores.clone()
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clone()
    inds = list(range(len(b)))
    n, out = len(b), []
    i = 0
    while i < n:
        mx, mp = s[i].clone(), i
        for p in range(i + 1, n):
            if mx < s[p]:
                mx, mp = s[p].clone(), p
        b[i], b[mp] = b[mp], b[i]
        s[[i, mp]] = s[[mp, i]]
        area[[i, mp]] = area[[mp, i]]
        inds[i], inds[mp] = inds[mp], inds[i]
        out.append((float(s[i]), inds[i]))
        bi = torch.tensor(b[i])
        p = i + 1
        while p < n:
            bp = torch.tensor(b[p])
            iw = torch.clamp(torch.minimum(bi[2], bp[2]) - torch.maximum(bi[0], bp[0]), min=0)
            ih = torch.clamp(torch.minimum(bi[3], bp[3]) - torch.maximum(bi[1], bp[1]), min=0)
            inter = iw * ih
            ovr = inter / (area[i] + area[p] - inter)
            if ovr >= thr:
                s[p] = s[p] * (1 - ovr)
            if s[p] < min_score:
                b[p], s[p], area[p], inds[p] = b[n - 1], s[n - 1], area[n - 1], inds[n - 1]
                n -= 1
                p -= 1
            p += 1
        i += 1
    return out


@pytest.mark.parametrize("seed", range(6))
def test_soft_nms_equals_the_literal_kernel(seed):
    g = torch.Generator().manual_seed(seed)
    n = 40
    xy = torch.rand(n, 2, generator=g) * 50
    wh = torch.rand(n, 2, generator=g) * 30 + 2
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g) * 0.05 + 0.001
    if seed % 2:  # exact ties and duplicate boxes
        scores[5:10] = scores[4]
        boxes[10:13] = boxes[9]
    want = _soft_nms_literal(boxes, scores, 0.5, 1e-3)
    got_s, got_i = soft_nms(boxes, scores, 0.5, 1e-3)
    assert got_i.tolist() == [i for _, i in want]
    assert got_s.tolist() == [s for s, _ in want]  # bit for bit, float32
    s10, i10 = soft_nms(boxes, scores, 0.5, 1e-3, max_num=10)
    assert i10.tolist() == got_i[:10].tolist() and torch.equal(s10, got_s[:10])


def test_o365_variant_gn_fpn_bn_heads_and_giou(fx):
    """The O365 fine-tuning config's HTC++: GroupNorm FPN (bias-free convs; mmdet's ``gn`` keys convert), BatchNorm
    box heads (bias-free convs) and GIoU x10 on the decoded class-agnostic boxes over all sampled RoIs."""
    from adapterctl.models.cascade import delta2bbox, giou_loss
    from adapterctl.models.detector import convert_mmdet_heads

    torch.manual_seed(0)
    backbone = HTCBackbone(_Maps(fx["inputs"]), 32, num_heads=4, norm_groups=4)
    net = AdapterHTC(backbone, 3, conv_channels=16, fc_channels=64, semantic_classes=9, box_norm=True, box_loss="giou")
    inner = net.backbone.fpn.inner_blocks[0]
    assert inner[0].bias is None and isinstance(inner[1], torch.nn.GroupNorm) and inner[1].num_groups == 4
    conv = net.roi_heads.bbox_head[0].shared_convs[0]
    assert conv.conv.bias is None and isinstance(conv.bn, torch.nn.BatchNorm2d)
    official = {f"neck.lateral_convs.{i}.gn.weight": torch.rand(32) for i in range(4)}
    official.update({f"neck.fpn_convs.{i}.gn.bias": torch.rand(32) for i in range(4)})
    mapped, left = convert_mmdet_heads(official)
    assert left == [] and set(mapped) <= set(net.state_dict())
    net.train()
    record: dict = {}
    with torch.no_grad():
        feats = net.backbone(torch.zeros(1))
        losses = net.roi_heads.losses(
            feats, [fx["train"]["rpn"]["proposals"][:, :4]], [_hw(fx)], _targets(fx), record=record
        )
    st = record["stages"][0]
    pos = st["labels"] < 3
    decoded = delta2bbox(st["rois"][pos], st["bbox_pred"][pos], (0.1, 0.1, 0.2, 0.2))  # unclipped, class-agnostic
    want = 10.0 * giou_loss(decoded, st["gt_boxes"]).sum() / st["rois"].shape[0]
    assert int(pos.sum()) > 0
    torch.testing.assert_close(losses["loss_bbox.s0"], want, rtol=1e-6, atol=0)


def test_convert_reads_the_o365_layout_off_the_tensors(fx):
    from adapterctl.models.detector import mmdet_htc_overrides

    plain = mmdet_htc_overrides(fx["state_dict"])
    assert (
        "head.box_norm=false" in plain and "head.fpn_norm_groups=null" in plain and "head.semantic_classes=9" in plain
    )
    o365 = dict(fx["state_dict"])
    o365["roi_head.bbox_head.0.shared_convs.0.bn.weight"] = torch.ones(16)
    o365["neck.1.lateral_convs.0.gn.weight"] = torch.ones(32)
    got = mmdet_htc_overrides(o365)
    assert "head.box_norm=true" in got and "head.fpn_norm_groups=32" in got
