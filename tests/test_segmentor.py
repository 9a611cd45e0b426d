"""UperNet + FCN against mmseg's numbers, and the segmentor's inference modes."""

from __future__ import annotations

import pytest
import torch

from adapterctl.models.heads import FCNHead, UPerHead
from adapterctl.models.heads.common import seg_accuracy, seg_cross_entropy
from adapterctl.models.segmentor import EncoderDecoder

from .conftest import FIXTURES


@pytest.fixture(scope="module")
def upernet_fx() -> dict:
    return torch.load(FIXTURES / "official_upernet_a.pt", map_location="cpu", weights_only=True)


def _heads(fx):
    dec = UPerHead([32] * 4, channels=16, num_classes=7)
    aux = FCNHead(32, channels=8, num_classes=7)
    sd = fx["state_dict"]
    dec.load_state_dict({k.removeprefix("decode_head."): v for k, v in sd.items() if k.startswith("decode_head.")})
    aux.load_state_dict(
        {k.removeprefix("auxiliary_head."): v for k, v in sd.items() if k.startswith("auxiliary_head.")}
    )
    return dec, aux


def test_heads_reproduce_official_logits(upernet_fx):
    dec, aux = _heads(upernet_fx)
    with torch.no_grad():
        torch.testing.assert_close(dec.eval()(upernet_fx["inputs"]), upernet_fx["decode_logits"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(aux.eval()(upernet_fx["inputs"]), upernet_fx["aux_logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bn_train", [False, True])
def test_losses_equal_mmseg(upernet_fx, bn_train):
    dec, aux = _heads(upernet_fx)
    for head in (dec, aux):
        head.train()
        for m in head.modules():  # the fixture's losses switch dropout (and, in `loss`, BN) to eval
            if isinstance(m, torch.nn.Dropout2d) or (not bn_train and isinstance(m, torch.nn.BatchNorm2d)):
                m.eval()
    gt = upernet_fx["gt_semantic_seg"][:, 0]
    want = upernet_fx["loss_bn_train" if bn_train else "loss"]
    d, a = dec(upernet_fx["inputs"]), aux(upernet_fx["inputs"])
    torch.testing.assert_close(seg_cross_entropy(d, gt), want["decode.loss_ce"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seg_cross_entropy(a, gt, loss_weight=0.4), want["aux.loss_ce"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seg_accuracy(d, gt).reshape(1), want["decode.acc_seg"], rtol=1e-5, atol=1e-5)
    # PyTorch's default ignore_index mean is the wrong loss: make sure we are not computing it
    wrong = upernet_fx["loss_reference_not_mmseg"]["decode.loss_ce_if_mean_over_valid_pixels"]
    if not bn_train:
        assert abs(float(seg_cross_entropy(d, gt).detach()) - float(wrong)) > 0.1


class _ToyBackbone(torch.nn.Module):
    """A deterministic, translation-equivariant stand-in: four avg-pooled maps of a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 8, 1)
        self.feature_info = [{"num_chs": 8, "reduction": s} for s in (4, 8, 16, 32)]

    def forward(self, x):
        y = self.proj(x)
        return [torch.nn.functional.avg_pool2d(y, s) for s in (4, 8, 16, 32)]


def _segmentor(**kw) -> EncoderDecoder:
    torch.manual_seed(0)
    return EncoderDecoder(_ToyBackbone(), UPerHead([8] * 4, channels=8, num_classes=5), FCNHead(8, 8, 5), **kw).eval()


def test_slide_equals_whole_when_one_crop_covers_the_image():
    model = _segmentor(crop_size=(128, 128), stride=(85, 85))
    img = torch.rand(1, 3, 96, 128) * 255
    torch.testing.assert_close(model.predict(img, mode="slide"), model.predict(img, mode="whole"))


def test_slide_windows_cover_and_average():
    model = _segmentor(crop_size=(64, 64), stride=(48, 40))  # windows overlap unevenly; the last ones shift back
    img = torch.rand(1, 3, 100, 130) * 255
    out = model.predict(img, mode="slide", out_size=(100, 130))
    assert out.shape == (1, 5, 100, 130) and torch.isfinite(out).all()
    crops = []

    def scores_of_the_crop_itself(crop):  # each crop "predicts" its own pixels: averaging must rebuild the image
        crops.append(crop.shape[-2:])
        return crop[:, :1].expand(-1, 5, -1, -1)

    model.encode_decode = scores_of_the_crop_itself
    torch.testing.assert_close(model.slide_logits(img), img[:, :1].expand(-1, 5, -1, -1))
    assert len(crops) == 2 * 3 and all(tuple(c) == (64, 64) for c in crops)  # ceil(36 / 48) + 1, ceil(66 / 40) + 1
    model.encode_decode = lambda crop: crop.new_ones(crop.shape[0], 5, *crop.shape[-2:])
    torch.testing.assert_close(model.slide_logits(img), torch.ones(1, 5, 100, 130))  # every pixel counted


def test_non_multiple_input_is_padded_and_cropped_back():
    model = _segmentor()
    out = model.predict(torch.rand(1, 3, 70, 90) * 255)
    assert out.shape == (1, 5, 70, 90)


def test_aug_mode_averages_probabilities_over_scales_and_flips():
    model = _segmentor(aug_ratios=(0.5, 1.0, 1.5), aug_flip=True)
    img = torch.rand(1, 3, 64, 96) * 255
    probs = model.predict(img, mode="aug", out_size=(50, 70))
    assert probs.shape == (1, 5, 50, 70)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 50, 70))
    single = _segmentor(aug_ratios=(1.0,), aug_flip=False).predict(img, mode="aug")
    torch.testing.assert_close(single, model.predict(img, mode="whole").softmax(1), atol=1e-5, rtol=1e-5)


def test_training_returns_loss_dict():
    model = _segmentor().train()
    out = model(torch.rand(2, 3, 64, 64) * 255, torch.randint(0, 5, (2, 64, 64)))
    assert set(out) == {"loss_decode", "loss_aux", "acc_seg"}
    (out["loss_decode"] + out["loss_aux"]).backward()
    assert model.decode_head.conv_seg.weight.grad is not None
