"""HTC++'s multi-scale + flip test (the official ``_ms`` configs' ``HybridTaskCascadeAug.aug_test_vote``): box
mapping, size ranges, and the merged test against the single-view path on a small randomly initialised HTC."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapterctl.models.detector import AdapterHTC, HTCBackbone
from adapterctl.models.htc import multiclass_soft_nms
from adapterctl.models.htc_aug import (
    AugView,
    aug_views,
    check_scale_ranges,
    htc_aug_test,
    in_ranges,
    to_original,
    to_view,
    view_candidates,
)


class _Body(nn.Module):
    """Four conv maps at strides 4..32: enough backbone for the heads to see the image."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.down = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for _ in range(3))
        self.feature_info = [{"num_chs": c, "reduction": r} for r in (4, 8, 16, 32)]

    def forward(self, x):
        maps = [torch.relu(self.stem(x))]
        for conv in self.down:
            maps.append(torch.relu(conv(maps[-1])))
        return maps


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = AdapterHTC(
        HTCBackbone(_Body(), 16, num_heads=2), 3, conv_channels=8, fc_channels=16, semantic_classes=4,
        box_detections_per_img=100,
    )  # fmt: skip
    with torch.no_grad():  # sharper class scores than the init's near-uniform ones
        for head in net.roi_heads.bbox_head:
            head.fc_cls.weight.mul_(30.0)
    return net.eval()


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(1)
    img = torch.zeros(3, 96, 128)
    img[:, 20:70, 10:60] = 200.0  # a few bright blocks on noise: structure for the RPN
    img[:, 40:90, 80:120] = 120.0
    return (img + 40.0 * torch.rand(3, 96, 128, generator=g)).round().clamp(0, 255)


def test_box_mapping_is_mmdets():
    view = AugView(torch.zeros(3, 150, 200), (2.0, 1.5), True, None)
    box = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    # bbox_mapping: scale (x2, y1.5) then flip in the 200-wide view (x -> 200 - x)
    assert torch.equal(to_view(box, view), torch.tensor([[140.0, 30.0, 180.0, 60.0]]))
    assert torch.equal(to_original(to_view(box, view), view), box)
    plain = AugView(torch.zeros(3, 150, 200), (2.0, 1.5), False, None)
    assert torch.equal(to_original(torch.tensor([[20.0, 30.0, 60.0, 60.0]]), plain), box)


def test_size_ranges_follow_the_official_thresholds():
    side = torch.tensor([31.0, 32.0, 32.5, 96.0, 96.5, 300.0])
    boxes = torch.stack([torch.zeros(6), torch.zeros(6), side, side], 1)  # areas side^2
    assert in_ranges(boxes, ["s"]).tolist() == [0, 1]  # <= 32^2
    assert in_ranges(boxes, ["m"]).tolist() == [2, 3]  # (32^2, 96^2]
    assert in_ranges(boxes, ["l"]).tolist() == [4, 5]  # > 96^2
    assert in_ranges(boxes, ["s", "m"]).tolist() == [0, 1, 2, 3]
    assert in_ranges(boxes, None).tolist() == list(range(6))
    assert check_scale_ranges([["l"], ["s", "m"]], 2, "x") == [("l",), ("s", "m")]
    with pytest.raises(ValueError, match="2 entries for 3 test scales"):
        check_scale_ranges([["l"], ["s"]], 3, "data.test.aug_scale_ranges")
    with pytest.raises(ValueError, match="among s, m, l"):
        check_scale_ranges([["xl"]], 1, "data.test.aug_scale_ranges")


def test_views_are_mmdets_multiscale_flip_order(image):
    views = aug_views(image, [[256, 48], [128, 96]], flip=True, ranges=[["l"], ["s", "m"]])
    assert [(v.size, v.flip, v.ranges) for v in views] == [
        ((48, 64), False, ("l",)), ((48, 64), True, ("l",)), ((96, 128), False, ("s", "m")),
        ((96, 128), True, ("s", "m")),
    ]  # fmt: skip
    assert views[0].scale_factor == (0.5, 0.5)
    assert torch.equal(views[1].image, views[0].image.flip(-1))
    assert torch.equal(views[2].image, image)  # scale factor 1: the image itself


def _same_detections(got, want, box_atol=0.0, max_mask_pixels=0):
    assert torch.equal(got["labels"], want["labels"])
    torch.testing.assert_close(got["boxes"], want["boxes"], atol=box_atol, rtol=0)
    torch.testing.assert_close(got["scores"], want["scores"], atol=1e-6, rtol=0)
    assert int((got["masks"] != want["masks"]).sum()) <= max_mask_pixels


def test_one_unflipped_view_at_the_image_size_is_the_single_scale_test(model, image):
    """Scale factor 1, no flip, no size filter, 100 detections: exactly ``forward``'s soft-NMS test."""
    with torch.no_grad():
        want = model([image])[0]
        got = model.aug_test(image, [[128, 96]], flip=False, max_per_img=100)
    assert want["boxes"].shape[0] == 100  # enough detections to compare
    _same_detections(got, want)
    torch.testing.assert_close(got["mask_probs"], want["mask_probs"], atol=0, rtol=0)


def test_the_flipped_view_is_the_mirrored_image_mapped_back(model, image):
    """The flipped view alone equals the single-scale test of the mirrored image, with boxes mirrored back
    (x -> W - x) and masks un-flipped: the mapping of boxes into and out of a flipped view, and of its masks."""
    w = image.shape[-1]
    with torch.no_grad():
        mirrored = model([image.flip(-1)])[0]
        flipped = aug_views(image, [[128, 96]], flip=True)[1]
        got = htc_aug_test(model, [flipped], (96, 128), max_per_img=100)
    b = mirrored["boxes"]
    want = {
        "boxes": torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1), "scores": mirrored["scores"],
        "labels": mirrored["labels"], "masks": mirrored["masks"].flip(-1),
    }  # fmt: skip
    _same_detections(got, want, box_atol=1e-4, max_mask_pixels=int(got["masks"].numel() * 1e-4))


def test_views_merge_through_one_soft_nms_after_their_size_filters(model, image):
    """Two scales + flips with size ranges: each view contributes only boxes of its sizes (in original pixels),
    and the result is one soft-NMS over all views' candidates, masks averaged over views x stages."""
    ranges = [["l"], ["s", "m"]]
    views = aug_views(image, [[256, 48], [128, 96]], flip=True, ranges=ranges)
    with torch.no_grad():
        cands = [view_candidates(model, v)[:2] for v in views]
        got = model.aug_test(image, [[256, 48], [128, 96]], flip=True, scale_ranges=ranges, max_per_img=150)
    for (b, _), v in zip(cands, views, strict=True):
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        assert b.shape[0] > 0
        assert bool((area > 96.0**2).all()) if v.ranges == ("l",) else bool((area <= 96.0**2).all())
    boxes, scores = torch.cat([c[0] for c in cands]), torch.cat([c[1] for c in cands])
    want_boxes, want_scores, want_labels = multiclass_soft_nms(boxes, scores, 0.001, 0.5, 150)
    assert got["boxes"].shape[0] == 150
    assert torch.equal(got["boxes"], want_boxes) and torch.equal(got["scores"], want_scores)
    assert torch.equal(got["labels"], want_labels + 1)
    assert got["masks"].shape == (150, 1, 96, 128) and got["mask_probs"].shape == (150, 28, 28)
    # the masks average 4 views x 3 stages: a view's probabilities alone differ
    assert float(got["mask_probs"].min()) >= 0.0 and float(got["mask_probs"].max()) <= 1.0


def test_aug_test_is_htcs_only(model):
    from adapterctl.models.detector import AdapterCascadeMaskRCNN

    assert not hasattr(AdapterCascadeMaskRCNN, "aug_test")
    with pytest.raises(TypeError, match="HTC"):
        htc_aug_test(nn.Module(), [], (1, 1))


def test_a_checkpoint_from_before_the_aug_keys_takes_them_as_overrides():
    """A run saved before ``data.test.aug_*`` existed: eval / predict overrides of those keys still fit (they take
    the data group's defaults first); keys the checkpoint holds keep its values."""
    from omegaconf import OmegaConf

    from adapterctl.config import compose
    from adapterctl.models.build import checkpoint_config

    cfg = OmegaConf.to_container(compose("train", ["head=htc", "data=synthetic_det", "data.test.scales=[[96,64]]"]))
    for key in ("mode", "aug_scales", "aug_flip", "aug_scale_ranges", "aug_max_per_img"):
        del cfg["data"]["test"][key]
    got = checkpoint_config({"config": cfg}, ["data.test.aug_scales=[[128,64]]"])
    assert got.data.test.aug_scales == [[128, 64]] and got.data.test.mode == "whole"
    assert got.data.test.aug_max_per_img == 1000 and got.data.test.scales == [[96, 64]]  # its own value kept


def test_an_earlier_htc_row_checkpoint_gets_its_rows_ms_protocol():
    """An HTC++ row's checkpoint from before the aug keys: mode=aug takes that row's _ms scales and size ranges."""
    from omegaconf import OmegaConf

    from adapterctl.config import compose
    from adapterctl.models.build import checkpoint_config

    cfg = OmegaConf.to_container(compose("train", ["experiment=coco_htc_beit_adapter_l_3x"]))
    for key in ("mode", "aug_scales", "aug_flip", "aug_scale_ranges", "aug_max_per_img"):
        del cfg["data"]["test"][key]
    got = checkpoint_config({"config": cfg})
    assert got.data.test.aug_scales[-1] == [3000, 1600] and got.data.test.aug_scale_ranges[0] == ["l"]
    assert got.head.max_per_img == 100 and "max_per_img" not in got.data
