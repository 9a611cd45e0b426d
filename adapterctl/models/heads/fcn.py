"""FCN head (Long et al., CVPR 2015) as mmseg 0.20's ``FCNHead``: the auxiliary head of the UperNet configs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from adapterctl.models.heads.common import ConvBNReLU, NormLayer, SemanticHead, init_head_weights


class FCNHead(SemanticHead):
    """``num_convs`` ConvBNReLU layers on one backbone map, then a 1x1 classifier (loss ``loss_aux``, weight 0.4
    by default: the auxiliary head of the UperNet configs)."""

    def __init__(
        self,
        in_channels: int,
        channels: int = 256,
        num_classes: int = 150,
        num_convs: int = 1,
        kernel_size: int = 3,
        dilation: int = 1,
        concat_input: bool = False,
        dropout_ratio: float = 0.1,
        align_corners: bool = False,
        in_index: int = 2,
        norm_layer: NormLayer = nn.BatchNorm2d,
        loss_name: str = "loss_aux",
        loss_weight: float = 0.4,
        ignore_index: int = 255,
    ) -> None:
        super().__init__(
            loss_name=loss_name, loss_weight=loss_weight, ignore_index=ignore_index, align_corners=align_corners
        )
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        self.in_index = int(in_index)
        self.num_classes = num_classes
        layers = [ConvBNReLU(in_channels, channels, kernel_size, dilation, norm_layer)]
        layers += [ConvBNReLU(channels, channels, kernel_size, dilation, norm_layer) for _ in range(num_convs - 1)]
        self.convs = nn.Sequential(*layers)
        self.conv_cat = (
            ConvBNReLU(in_channels + channels, channels, kernel_size, norm_layer=norm_layer) if concat_input else None
        )
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        init_head_weights(self)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        x = features[self.in_index]
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.conv_seg(self.dropout(out))
