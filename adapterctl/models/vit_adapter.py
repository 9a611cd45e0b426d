"""ViT-Adapter: a plain timm ViT plus spatial prior, injectors and extractors.

Chen et al., "Vision Transformer Adapter for Dense Predictions", ICLR 2023. Numerically the official
implementation (czczup/ViT-Adapter): see ``shared/reference/architecture.md`` for the contract this file keeps.
The ViT is wrapped, not forked: its blocks run inside the interaction groups, and timm weights load unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn

from adapterctl.layers.checkpointing import checkpointed as _checkpointed
from adapterctl.layers.ms_deform_attn import MSDeformAttn
from adapterctl.models.trunks import trunk_for

Shapes = list[tuple[int, int]]
LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)


def _resize_to(x: Tensor, size) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _tokens_to_map(tokens: Tensor, hw: tuple[int, int]) -> Tensor:
    """(B, h*w, D) tokens as a (B, D, h, w) map in channels-last memory (a view when possible)."""
    b, _, d = tokens.shape
    return tokens.reshape(b, hw[0], hw[1], d).permute(0, 3, 1, 2)


def _upsample_2x2_add(up: nn.ConvTranspose2d, x: Tensor, skip: Tensor) -> Tensor:
    """``up(x) + skip`` for ``up`` a 2x2, stride-2 transposed convolution on the (B, D, h, w) map ``x``.

    Output pixel (2i + di, 2j + dj) is input pixel (i, j) times kernel tap (di, dj): one (B h w, D) x (D, 4 O)
    matmul gives every tap of every pixel (the same sums as ``up(x)``, without oneDNN's transposed-convolution
    backward, 4x slower than the matmul's on CPU). Channels-last maps (rows are pixels): the taps land in the
    sum with ``skip`` straight from the matmul's rows, one pass over the stride-4 map and no shuffled copy.
    Contiguous maps: a batched matmul and ``pixel_shuffle``. The result has ``skip``'s layout.
    """
    b, d, h, w = x.shape
    out = up.out_channels
    channels_last = skip.is_contiguous(memory_format=torch.channels_last) and not skip.is_contiguous()
    if channels_last and x.is_contiguous(memory_format=torch.channels_last):
        weight = up.weight.permute(0, 2, 3, 1).reshape(d, 4 * out)  # column (di * 2 + dj) * O + o
        bias = torch.zeros_like(weight[0]) if up.bias is None else up.bias.repeat(4)
        taps = torch.addmm(bias, x.permute(0, 2, 3, 1).reshape(b * h * w, d), weight).view(b, h, w, 2, 2, out)
        # (b, i, di, j, dj, o) is the channels-last memory of the (b, o, 2i + di, 2j + dj) map
        total = torch.add(skip.permute(0, 2, 3, 1).view(b, h, 2, w, 2, out), taps.permute(0, 1, 3, 2, 4, 5))
        return total.view(b, 2 * h, 2 * w, out).permute(0, 3, 1, 2)
    weight = up.weight.reshape(d, out * 4)  # (in, out, di, dj): column o * 4 + di * 2 + dj, pixel_shuffle's order
    bias = torch.zeros_like(weight[0]) if up.bias is None else up.bias.repeat_interleave(4)
    if x.is_contiguous():
        y = torch.baddbmm(bias.view(1, -1, 1), weight.t().expand(b, -1, -1), x.view(b, d, h * w))
        y = y.view(b, out * 4, h, w)
    else:  # channels-last: rows are pixels
        y = torch.addmm(bias, x.permute(0, 2, 3, 1).reshape(b * h * w, d), weight).view(b, h, w, out * 4)
        y = y.permute(0, 3, 1, 2)
    return skip + F.pixel_shuffle(y, 2)  # skip first: a mixed-layout sum takes the first operand's layout


def reference_points(shapes: Shapes, device: torch.device) -> Tensor:
    """Pixel centres of each (H, W) grid as normalised (x, y), concatenated: (1, sum HW, 1, 2)."""
    refs = []
    for h, w in shapes:
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        refs.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
    return torch.cat(refs, 0)[None, :, None]


def _channels_last_convs(device: torch.device) -> bool:
    """Whether the spatial prior module runs its convolutions channels-last (its maps flatten to tokens
    without a copy either way; the outputs are the same numbers).

    Inference: always (oneDNN's forward is ~1.4x faster). Training: only on CPUs whose torch kernels are
    AVX512: there oneDNN's channels-last backward is 1.3x (fp32) to 2x (bf16) faster than NCHW's, while on
    AVX2-only CPUs it is up to 1.6x slower (``adapterctl bench`` shows the spatial prior module's share). CUDA
    trains NCHW as before.
    """
    if not torch.is_grad_enabled():
        return True
    return device.type == "cpu" and torch.backends.cpu.get_cpu_capability() == "AVX512"


class SpatialPriorModule(nn.Module):
    """Convolutional stem giving stride 4/8/16/32 maps, projected to the ViT width (paper §3.2)."""

    def __init__(
        self,
        inplanes: int = 64,
        embed_dim: int = 384,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        self.with_cp = with_cp

        def conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                norm_layer(cout),
                nn.ReLU(inplace=True),
            ]

        self.stem = nn.Sequential(
            *conv_bn_relu(3, inplanes, 2),
            *conv_bn_relu(inplanes, inplanes, 1),
            *conv_bn_relu(inplanes, inplanes, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if _channels_last_convs(x.device):
            x = x.contiguous(memory_format=torch.channels_last)
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns c1 as a (B, D, h/4, w/4) map and c2..c4 as (B, HW_l, D) tokens."""
        if self.with_cp and x.requires_grad and torch.is_grad_enabled():
            c1, c2, c3, c4 = cp.checkpoint(self._forward, x, use_reentrant=False)
        else:
            c1, c2, c3, c4 = self._forward(x)
        return c1, c2.flatten(2).transpose(1, 2), c3.flatten(2).transpose(1, 2), c4.flatten(2).transpose(1, 2)


class DWConv(nn.Module):
    """One depthwise 3x3 conv shared by the three scales of the token set ``c``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: Tensor, shapes: Shapes) -> Tensor:
        b, _, c = x.shape
        parts, start = [], 0
        for h, w in shapes:
            # B, hw, C viewed as a channels-last B, C, h, w map: no copy in, none out
            part = x[:, start : start + h * w].reshape(b, h, w, c).permute(0, 3, 1, 2)
            parts.append(self.dwconv(part).permute(0, 2, 3, 1).reshape(b, h * w, c))
            start += h * w
        return torch.cat(parts, dim=1)


class ConvFFN(nn.Module):
    """fc1 -> shared depthwise conv -> GELU -> fc2 (the extractor's FFN)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, shapes: Shapes) -> Tensor:
        x = self.act(self.dwconv(self.fc1(x), shapes))
        return self.drop(self.fc2(self.drop(x)))


class Injector(nn.Module):
    """Spatial priors into the ViT tokens: ``x + gamma * MSDeformAttn(LN(x), LN(c))`` (paper §3.3)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 6,
        n_points: int = 4,
        n_levels: int = 3,
        deform_ratio: float = 1.0,
        norm_layer: Callable[[int], nn.Module] = LayerNorm6,
        init_values: float = 0.0,
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.query_norm = norm_layer(dim)
        self.feat_norm = norm_layer(dim)
        self.attn = MSDeformAttn(
            d_model=dim, n_levels=n_levels, n_heads=num_heads, n_points=n_points, ratio=deform_ratio
        )
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor, c: Tensor, ref: Tensor, shapes: Shapes) -> Tensor:
        def _inner(x: Tensor, c: Tensor) -> Tensor:
            return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(c), shapes)

        return _checkpointed(_inner, x, c, enabled=self.with_cp)


class Extractor(nn.Module):
    """Multi-scale features from the ViT tokens: ``c + MSDeformAttn(LN(c), LN(x))``, then a ConvFFN."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 6,
        n_points: int = 4,
        n_levels: int = 1,
        deform_ratio: float = 1.0,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = LayerNorm6,
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.query_norm = norm_layer(dim)
        self.feat_norm = norm_layer(dim)
        self.attn = MSDeformAttn(
            d_model=dim, n_levels=n_levels, n_heads=num_heads, n_points=n_points, ratio=deform_ratio
        )
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio), drop=drop)
            self.ffn_norm = norm_layer(dim)
            self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, query: Tensor, feat: Tensor, ref: Tensor, shapes: Shapes, c_shapes: Shapes) -> Tensor:
        def _inner(query: Tensor, feat: Tensor) -> Tensor:
            query = query + self.attn(self.query_norm(query), ref, self.feat_norm(feat), shapes)
            if self.with_cffn:
                query = query + self.drop_path(self.ffn(self.ffn_norm(query), c_shapes))
            return query

        return _checkpointed(_inner, query, feat, enabled=self.with_cp)


class InteractionBlock(nn.Module):
    """Injector -> a group of ViT blocks (run by the trunk) -> extractor (+ two extra extractors after the last
    group)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 6,
        n_points: int = 4,
        norm_layer: Callable[[int], nn.Module] = LayerNorm6,
        drop: float = 0.0,
        drop_path: float = 0.0,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        init_values: float = 0.0,
        deform_ratio: float = 1.0,
        extra_extractor: bool = False,
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        self.injector = Injector(
            dim=dim,
            num_heads=num_heads,
            n_points=n_points,
            n_levels=3,
            deform_ratio=deform_ratio,
            norm_layer=norm_layer,
            init_values=init_values,
            with_cp=with_cp,
        )
        extractor = partial(
            Extractor,
            dim=dim,
            num_heads=num_heads,
            n_points=n_points,
            n_levels=1,
            deform_ratio=deform_ratio,
            with_cffn=with_cffn,
            cffn_ratio=cffn_ratio,
            drop=drop,
            drop_path=drop_path,
            norm_layer=norm_layer,
            with_cp=with_cp,
        )
        self.extractor = extractor()
        self.extra_extractors = nn.Sequential(extractor(), extractor()) if extra_extractor else None
        self.inject = True  # False with a frozen ViT: nothing flows back through it to train the injector

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        prefix: Tensor | None,
        run_vit: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor | None]],
        deform_inputs: tuple[Tensor, Shapes, Tensor, Shapes],
        c_shapes: Shapes,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``run_vit(tokens, prefix)``: this group's ViT blocks (the trunk's ``run_blocks``); ``prefix`` tokens ride
        along with the patch tokens and never enter the injector or extractor."""
        ref1, shapes1, ref2, shapes2 = deform_inputs
        if self.inject:
            x = self.injector(x, c, ref1, shapes1)
        x, prefix = run_vit(x, prefix)
        c = self.extractor(c, x, ref2, shapes2, c_shapes)
        if self.extra_extractors is not None:
            for extractor in self.extra_extractors:
                c = extractor(c, x, ref2, shapes2, c_shapes)
        return x, c, prefix


class ViTAdapter(nn.Module):
    """A timm VisionTransformer with the ViT-Adapter around it; returns maps at strides 4, 8, 16 and 32.

    Args:
        vit: a plain ViT that a trunk drives (``adapterctl.models.trunks``; timm ``VisionTransformer`` with 16x16
            patches today). Its blocks are run in ``interaction_indexes`` groups; its cls token, final norm and
            head are not used.
        interaction_indexes: inclusive ``[first, last]`` block indices of each interaction group.
        conv_inplane: spatial prior module width C (maps have C, 2C, 4C, 4C channels).
        n_points, deform_num_heads, deform_ratio: MSDeformAttn sampling points, heads and value width ratio.
        init_values: initial injector gamma.
        with_cffn, cffn_ratio: ConvFFN in the extractors and its hidden ratio.
        drop_path_rate: the (constant) DropPath rate of every extractor's FFN, as the official code does.
        add_vit_feature: add the ViT token maps to the outputs.
        vit_feature_mode: ``"per_interaction"`` (segmentation code: interaction i feeds map i) or ``"final"``
            (detection code: the last tokens feed all four maps).
        use_extra_extractor: two more extractors after the last interaction.
        with_cp: activation checkpointing of the ViT blocks, injectors and extractors.
        window_attn, window_size: per-block window attention switches and sizes (None: all global).
        norm_layer: 2-D norm for the spatial prior module and the four output norms. BatchNorm2d by default;
            convert to SyncBatchNorm only when training distributed.
        freeze_vit: the plain ViT runs without gradients (``no_grad``, eval mode, its parameters frozen and out
            of the optimizer) while the spatial prior module, extractors and output norms train, as DINOv2/DINOv3
            evaluations do. The injectors are not applied (a ViT that passes no gradient back cannot teach them):
            the ViT computes exactly its own features.
        freeze_vit_dtype: ``"bfloat16"`` runs the frozen ViT under bf16 autocast (None: the ambient precision).
    """

    def __init__(
        self,
        vit: nn.Module,
        *,
        interaction_indexes: Sequence[Sequence[int]],
        conv_inplane: int = 64,
        n_points: int = 4,
        deform_num_heads: int = 6,
        init_values: float = 0.0,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        deform_ratio: float = 1.0,
        drop_path_rate: float = 0.0,
        add_vit_feature: bool = True,
        vit_feature_mode: Literal["per_interaction", "final"] = "per_interaction",
        use_extra_extractor: bool = True,
        with_cp: bool = False,
        window_attn: Sequence[bool] | None = None,
        window_size: Sequence[int | None] | int | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        freeze_vit: bool = False,
        freeze_vit_dtype: str | None = None,
    ) -> None:
        super().__init__()
        trunk = trunk_for(vit)
        if freeze_vit_dtype not in (None, "bfloat16", "float32"):
            raise ValueError(f"freeze_vit_dtype must be null, float32 or bfloat16, got {freeze_vit_dtype!r}")
        if vit_feature_mode not in ("per_interaction", "final"):
            raise ValueError(f"vit_feature_mode must be 'per_interaction' or 'final', got {vit_feature_mode!r}")
        depth = trunk.depth
        groups = [list(map(int, idx)) for idx in interaction_indexes]
        for idx in groups:
            if not (0 <= idx[0] <= idx[-1] < depth):
                raise ValueError(f"interaction index {idx} is outside the ViT's {depth} blocks")
        if add_vit_feature and vit_feature_mode == "per_interaction" and len(groups) != 4:
            raise ValueError(
                "vit_feature_mode='per_interaction' adds interaction i's tokens to output map i and needs exactly "
                f"4 interactions, got {len(groups)}; use vit_feature_mode='final' or add_vit_feature=False"
            )
        self.vit = vit
        self.trunk = trunk  # drives self.vit; holds no parameters of its own
        self.embed_dim = embed_dim = trunk.embed_dim
        self.interaction_indexes = groups
        self.add_vit_feature = add_vit_feature
        self.vit_feature_mode = vit_feature_mode
        self.with_cp = with_cp
        self.drop_path_rate = drop_path_rate
        trunk.apply_window_attention(window_attn, window_size)

        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        self.spm = SpatialPriorModule(inplanes=conv_inplane, embed_dim=embed_dim, norm_layer=norm_layer)
        self.interactions = nn.Sequential(
            *[
                InteractionBlock(
                    dim=embed_dim,
                    num_heads=deform_num_heads,
                    n_points=n_points,
                    init_values=init_values,
                    drop_path=drop_path_rate,
                    norm_layer=LayerNorm6,
                    with_cffn=with_cffn,
                    cffn_ratio=cffn_ratio,
                    deform_ratio=deform_ratio,
                    extra_extractor=use_extra_extractor and i == len(groups) - 1,
                    with_cp=with_cp,
                )
                for i in range(len(groups))
            ]
        )
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        self.norm1 = norm_layer(embed_dim)
        self.norm2 = norm_layer(embed_dim)
        self.norm3 = norm_layer(embed_dim)
        self.norm4 = norm_layer(embed_dim)
        self.feature_info = [
            {"num_chs": embed_dim, "reduction": stride, "module": f"norm{i + 1}"}
            for i, stride in enumerate((4, 8, 16, 32))
        ]
        self.init_adapter_weights()
        self.freeze_vit = bool(freeze_vit)
        self.freeze_vit_dtype = freeze_vit_dtype
        if self.freeze_vit:
            vit.requires_grad_(False)
            for layer in self.interactions:
                layer.inject = False
                layer.injector.requires_grad_(False)
            vit.eval()

    def train(self, mode: bool = True) -> ViTAdapter:
        super().train(mode)
        if self.freeze_vit:
            self.vit.eval()  # no dropout / drop path in a frozen ViT
        return self

    def _frozen(self):
        """The context the ViT runs in: ``no_grad`` (+ bf16 autocast) when frozen."""
        if not self.freeze_vit:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        if self.freeze_vit_dtype == "bfloat16":
            stack.enter_context(torch.autocast(self.level_embed.device.type, dtype=torch.bfloat16))
        return stack

    # ------------------------------------------------------------------ construction
    def init_adapter_weights(self) -> None:
        """The official initialisation of the adapter; the ViT part is left as it is."""

        def _init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.LayerNorm | nn.modules.batchnorm._BatchNorm | nn.GroupNorm):
                if m.weight is not None:
                    nn.init.constant_(m.weight, 1.0)
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    m.bias.data.zero_()

        for module in (self.up, self.spm, self.interactions):
            module.apply(_init)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> list[Tensor]:
        """x: (B, 3, h, w), h and w multiples of 32. Returns [f1, f2, f3, f4] at strides 4, 8, 16, 32."""
        b, _, h, w = x.shape
        if h % 32 or w % 32:
            raise ValueError(
                f"ViTAdapter input height and width must be multiples of 32, got {h}x{w} "
                "(pad the image; the segmentor and detector do)"
            )
        with self._frozen():
            tokens, prefix, hw = self.trunk.embed(x)
        c_shapes = [(h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)]
        ref1 = reference_points([hw], x.device)
        ref2 = reference_points(c_shapes, x.device)
        deform_inputs = (ref1, c_shapes, ref2, [hw])

        c1, c2, c3, c4 = self.spm(x)
        c = torch.cat([c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]], dim=1)

        outs = []
        for layer, (first, last) in zip(self.interactions, self.interaction_indexes, strict=True):
            run_vit = partial(self.trunk.run_blocks, first=first, last=last, hw=hw, checkpoint=self.with_cp)
            if self.freeze_vit:
                run_vit = partial(self._run_frozen, run_vit)
            tokens, c, prefix = layer(tokens, c, prefix, run_vit, deform_inputs, c_shapes)
            outs.append(tokens)
        return self._output_maps(c1, c, outs, c_shapes, hw)

    def _output_maps(self, c1: Tensor, c: Tensor, outs: list[Tensor], c_shapes: Shapes, hw: tuple[int, int]):
        """The four normalised maps from the stride-4 map ``c1``, the stride 8/16/32 token sets ``c`` and the ViT
        tokens of each interaction ``outs``."""
        # token sets back to maps, all in c1's memory layout (the spatial prior module's: channels-last in
        # inference and in CPU training with AVX512, else contiguous): sums of mixed layouts run 5x slower and
        # the BatchNorms' backward wants one layout. The four outputs keep it (a 12 MiB transposed copy of the
        # stride-4 map otherwise); heads read either.
        channels_last = not c1.is_contiguous() and c1.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format

        def to_map(tokens: Tensor, shape: tuple[int, int]) -> Tensor:
            return _tokens_to_map(tokens, shape).contiguous(memory_format=layout)

        n2, n3 = c_shapes[0][0] * c_shapes[0][1], c_shapes[1][0] * c_shapes[1][1]
        c2 = to_map(c[:, :n2], c_shapes[0])
        c1 = _upsample_2x2_add(self.up, c2, c1)
        c3 = to_map(c[:, n2 : n2 + n3], c_shapes[1])
        c4 = to_map(c[:, n2 + n3 :], c_shapes[2])

        if self.add_vit_feature:
            if self.vit_feature_mode == "per_interaction":
                x1, x2, x3, x4 = (to_map(o, hw) for o in outs)
            else:
                x1 = x2 = x3 = x4 = to_map(outs[-1], hw)
            # explicit sizes: the ViT grid is the stride-16 map for 16x16 patches (the official scale factors 4,
            # 2, 1, 0.5 give the same numbers), the 1/p grid otherwise
            c1 = c1 + _resize_to(x1, c1.shape[-2:])
            c2 = c2 + _resize_to(x2, c2.shape[-2:])
            c3 = c3 + _resize_to(x3, c3.shape[-2:])
            c4 = c4 + _resize_to(x4, c4.shape[-2:])

        return [
            norm(f.contiguous(memory_format=layout))
            for norm, f in zip((self.norm1, self.norm2, self.norm3, self.norm4), (c1, c2, c3, c4), strict=True)
        ]

    def _run_frozen(self, run_vit, tokens: Tensor, prefix: Tensor | None) -> tuple[Tensor, Tensor | None]:
        with self._frozen():
            tokens, prefix = run_vit(tokens, prefix)
        if self.freeze_vit_dtype == "bfloat16":  # the trainable rest runs at the ambient precision
            tokens = tokens.float()
            prefix = prefix.float() if prefix is not None else None
        return tokens, prefix

    # ------------------------------------------------------------------ introspection
    def vit_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if n.startswith("vit.")]

    def adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("vit.")]
