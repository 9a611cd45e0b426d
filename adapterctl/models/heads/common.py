"""Building blocks shared by the decode heads (mmseg naming, so official checkpoints load 1:1)."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

NormLayer = Callable[[int], nn.Module]


class ConvBNReLU(nn.Module):
    """conv (no bias) -> norm -> ReLU, with submodules ``conv`` and ``bn`` as mmcv's ConvModule names them."""

    def __init__(
        self, cin: int, cout: int, kernel_size: int = 1, dilation: int = 1, norm_layer: NormLayer = nn.BatchNorm2d
    ) -> None:
        super().__init__()
        pad = dilation * (kernel_size // 2)
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=pad, dilation=dilation, bias=False)
        self.bn = norm_layer(cout)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


def resize(x: Tensor, size: tuple[int, int] | list[int], align_corners: bool = False) -> Tensor:
    """Bilinear resize, no antialiasing (mmseg's ``resize``)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def init_head_weights(head: nn.Module) -> None:
    """mmcv 1.4.2 semantics: convs kaiming-normal (fan_out, relu), norms 1/0, ``conv_seg`` N(0, 0.01)."""
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(head.conv_seg.weight, 0.0, 0.01)
    nn.init.zeros_(head.conv_seg.bias)


def seg_cross_entropy(
    logits: Tensor, labels: Tensor, ignore_index: int = 255, loss_weight: float = 1.0, align_corners: bool = False
) -> Tensor:
    """mmseg 0.20 cross-entropy: logits resized to the labels, summed CE divided by **all** pixels.

    Ignored pixels add 0 to the sum but count in the denominator (mmseg 0.20.2 has no ``avg_non_ignore``).
    """
    up = resize(logits.float(), labels.shape[-2:], align_corners)
    ce = F.cross_entropy(up, labels, ignore_index=ignore_index, reduction="none")
    return loss_weight * ce.sum() / labels.numel()


def seg_accuracy(logits: Tensor, labels: Tensor, align_corners: bool = False) -> Tensor:
    """mmseg's ``acc_seg``: percent of all pixels (ignored ones count as wrong) predicted right."""
    up = resize(logits.float(), labels.shape[-2:], align_corners)
    return 100.0 * (up.argmax(1) == labels).sum() / labels.numel()


class SemanticHead(nn.Module):
    """The contract of a semantic-segmentation head: ``forward(features) -> outputs``; ``loss(outputs, labels)``
    returns its ``loss_*`` terms; ``semantic_scores(outputs)`` returns (B, num_classes, h, w) scores whose argmax
    is the prediction, at the head's own stride (:class:`EncoderDecoder` resizes, slides and averages them).

    This base is the per-pixel classifier (UperNet, FCN): outputs are logits, the loss is mmseg 0.20's
    cross-entropy weighted by ``loss_weight`` and named ``loss_name``. A query-based head (Mask2Former) keeps the
    contract with its own outputs, loss and scores.
    """

    num_classes: int

    def __init__(
        self, *, loss_name: str = "loss_decode", loss_weight: float = 1.0, ignore_index: int = 255,
        align_corners: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.loss_name, self.loss_weight = loss_name, float(loss_weight)
        self.ignore_index, self.align_corners = int(ignore_index), align_corners

    def loss(self, outputs: Tensor, labels: Tensor) -> dict[str, Tensor]:
        return {
            self.loss_name: seg_cross_entropy(outputs, labels, self.ignore_index, self.loss_weight, self.align_corners)
        }

    def semantic_scores(self, outputs: Tensor) -> Tensor:
        return outputs
