"""UperNet decode head (Xiao et al., "Unified Perceptual Parsing", ECCV 2018) as mmseg 0.20's ``UPerHead``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from adapterctl.models.heads.common import ConvBNReLU, NormLayer, SemanticHead, init_head_weights, resize


class UPerHead(SemanticHead):
    """Pyramid pooling on the coarsest map + an FPN with bilinear top-down fusion; logits at stride 4.

    Args:
        in_channels: channels of the input maps (from the backbone's ``feature_info``).
        channels: the head's width (512 in the paper; narrower is far cheaper on CPU).
        num_classes: output classes.
        pool_scales: adaptive-pooling sizes of the PPM.
        dropout_ratio: channel dropout (``Dropout2d``) before the classifier.
        in_index: which backbone maps to use.
        loss_name, loss_weight, ignore_index: the cross-entropy term (:class:`SemanticHead`).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int = 512,
        num_classes: int = 150,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout_ratio: float = 0.1,
        align_corners: bool = False,
        in_index: Sequence[int] = (0, 1, 2, 3),
        norm_layer: NormLayer = nn.BatchNorm2d,
        loss_name: str = "loss_decode",
        loss_weight: float = 1.0,
        ignore_index: int = 255,
    ) -> None:
        super().__init__(
            loss_name=loss_name, loss_weight=loss_weight, ignore_index=ignore_index, align_corners=align_corners
        )
        in_channels = [int(c) for c in in_channels]
        self.in_index = [int(i) for i in in_index]
        if len(in_channels) != len(self.in_index):
            raise ValueError(f"in_channels {in_channels} and in_index {self.in_index} differ in length")
        self.num_classes = num_classes
        top = in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(top, channels, 1, norm_layer=norm_layer))
            for s in pool_scales
        )
        self.bottleneck = ConvBNReLU(top + len(pool_scales) * channels, channels, 3, norm_layer=norm_layer)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1, norm_layer=norm_layer) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(
            ConvBNReLU(channels, channels, 3, norm_layer=norm_layer) for _ in in_channels[:-1]
        )
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3, norm_layer=norm_layer)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        init_head_weights(self)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        feats = [features[i] for i in self.in_index]
        top = feats[-1]
        psp = [top] + [resize(m(top), top.shape[2:], self.align_corners) for m in self.psp_modules]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats[:-1], strict=True)]
        laterals.append(self.bottleneck(torch.cat(psp, dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:], self.align_corners)
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1], strict=True)]
        outs.append(laterals[-1])
        size = outs[0].shape[2:]
        outs = [outs[0]] + [resize(o, size, self.align_corners) for o in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))
