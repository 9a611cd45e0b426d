"""Model entry points: ``vit_adapter_{t,s,b,l}`` around one builder, with the released hyperparameters.

The values are those of the official ADE20K UperNet configs (architecture.md §2.13, configs-and-results.md
§3.1); ``task="detection"`` switches to the detection copy's window attention and ViT-feature form (§2.10).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

from torch import nn

from adapterctl.models.vit_adapter import ViTAdapter

Task = Literal["segmentation", "detection"]

# Official constructor arguments per size; ``window_*`` for detection come from _detection_windows.
VARIANTS: dict[str, dict[str, Any]] = {
    "t": dict(
        embed_dim=192,
        depth=12,
        num_heads=3,
        deform_num_heads=6,
        deform_ratio=1.0,
        drop_path_rate=0.1,
        interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]],
    ),
    "s": dict(
        embed_dim=384,
        depth=12,
        num_heads=6,
        deform_num_heads=6,
        deform_ratio=1.0,
        drop_path_rate=0.2,
        interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]],
    ),
    "b": dict(
        embed_dim=768,
        depth=12,
        num_heads=12,
        deform_num_heads=12,
        deform_ratio=0.5,
        drop_path_rate=0.3,
        interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]],
    ),
    "l": dict(
        embed_dim=1024,
        depth=24,
        num_heads=16,
        deform_num_heads=16,
        deform_ratio=0.5,
        drop_path_rate=0.4,
        interaction_indexes=[[0, 5], [6, 11], [12, 17], [18, 23]],
    ),
}

# Shared by every size.
COMMON: dict[str, Any] = dict(
    img_size=224,
    mlp_ratio=4.0,
    qkv_bias=True,
    layer_scale=True,
    conv_inplane=64,
    n_points=4,
    init_values=0.0,
    with_cffn=True,
    cffn_ratio=0.25,
    add_vit_feature=True,
    use_extra_extractor=True,
    with_cp=False,
)


def _detection_windows(interaction_indexes: Sequence[Sequence[int]], depth: int) -> dict[str, Any]:
    """Window attention (14x14) on every block except the last of each interaction group (§2.13)."""
    global_blocks = {int(idx[-1]) for idx in interaction_indexes}
    return dict(
        window_attn=[i not in global_blocks for i in range(depth)],
        window_size=[None if i in global_blocks else 14 for i in range(depth)],
        vit_feature_mode="final",
    )


def variant_kwargs(size: str, task: Task = "segmentation") -> dict[str, Any]:
    """The full constructor arguments of ``build_vit_adapter`` for a released size."""
    if size not in VARIANTS:
        raise ValueError(f"unknown ViT-Adapter size {size!r}; choose one of {sorted(VARIANTS)}")
    kwargs = {**COMMON, **copy.deepcopy(VARIANTS[size])}
    if task == "detection":
        kwargs.update(_detection_windows(kwargs["interaction_indexes"], kwargs["depth"]))
    elif task == "segmentation":
        kwargs.update(window_attn=None, window_size=None, vit_feature_mode="per_interaction")
    else:
        raise ValueError(f"task must be 'segmentation' or 'detection', got {task!r}")
    return kwargs


def build_vit_adapter(
    *,
    vit: str | None = None,
    img_size: int = 224,
    embed_dim: int = 384,
    depth: int = 12,
    num_heads: int = 6,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    layer_scale: bool = True,
    drop_path_rate: float = 0.0,
    interaction_indexes: Sequence[Sequence[int]] = ((0, 2), (3, 5), (6, 8), (9, 11)),
    norm_layer: Callable[[int], nn.Module] | str = "batchnorm",
    **adapter_kwargs: Any,
) -> ViTAdapter:
    """Build a ViT-Adapter around a timm VisionTransformer. No file I/O: pretrained ViT weights are loaded
    afterwards (:func:`adapterctl.models.pretrained.load_pretrained`; ``adapterctl train`` does it when it starts a
    run, never when it resumes one), so a checkpoint alone rebuilds the model anywhere.

    Args:
        vit: a timm model name (``vit_small_patch16_384``, ...) to wrap instead of the plain DeiT-style ViT that
            ``embed_dim``/``depth``/``num_heads``/``mlp_ratio``/``qkv_bias`` describe. Never downloads weights.
        img_size: the ViT's pretraining size; sets the position-embedding grid (``img_size // 16``).
        layer_scale: per-block ``gamma1``/``gamma2`` (init 1), as every official config has.
        norm_layer: ``"batchnorm"`` (default), ``"syncbatchnorm"`` or a callable, for the SPM and output norms.
        adapter_kwargs: the remaining :class:`ViTAdapter` arguments.
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    common = dict(
        num_classes=0,
        global_pool="",
        class_token=True,
        drop_path_rate=drop_path_rate,
        init_values=1.0 if layer_scale else None,
    )
    if vit is None:
        model = VisionTransformer(
            img_size=img_size,
            patch_size=16,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            act_layer=nn.GELU,
            weight_init="skip",
            **common,
        )
        # the official ViT keeps PyTorch's default init with a zero position embedding
        nn.init.zeros_(model.pos_embed)
    else:
        model = timm.create_model(vit, pretrained=False, img_size=img_size, **common)
    model.norm = nn.Identity()  # the adapter has its own output norms; the ViT's final norm is unused
    norm = _resolve_norm(norm_layer)
    adapter = ViTAdapter(
        model,
        interaction_indexes=interaction_indexes,
        drop_path_rate=drop_path_rate,
        norm_layer=norm,
        **adapter_kwargs,
    )
    return adapter


def _resolve_norm(norm_layer: Callable[[int], nn.Module] | str) -> Callable[[int], nn.Module]:
    if callable(norm_layer):
        return norm_layer
    choices = {"batchnorm": nn.BatchNorm2d, "syncbatchnorm": nn.SyncBatchNorm}
    if norm_layer not in choices:
        raise ValueError(f"norm_layer must be one of {sorted(choices)} or a callable, got {norm_layer!r}")
    return choices[norm_layer]


def _entry(size: str, task: Task = "segmentation", **overrides: Any) -> ViTAdapter:
    return build_vit_adapter(**{**variant_kwargs(size, task), **overrides})


def vit_adapter_t(task: Task = "segmentation", **overrides: Any) -> ViTAdapter:
    """ViT-Adapter-T: DeiT-T (192-d, 12 blocks, 3 heads), 6 deformable heads, ratio 1.0, dpr 0.1."""
    return _entry("t", task, **overrides)


def vit_adapter_s(task: Task = "segmentation", **overrides: Any) -> ViTAdapter:
    """ViT-Adapter-S: DeiT-S (384-d, 12 blocks, 6 heads), 6 deformable heads, ratio 1.0, dpr 0.2."""
    return _entry("s", task, **overrides)


def vit_adapter_b(task: Task = "segmentation", **overrides: Any) -> ViTAdapter:
    """ViT-Adapter-B: DeiT-B (768-d, 12 blocks, 12 heads), 12 deformable heads, ratio 0.5, dpr 0.3."""
    return _entry("b", task, **overrides)


def vit_adapter_l(task: Task = "segmentation", **overrides: Any) -> ViTAdapter:
    """ViT-Adapter-L: ViT-L (1024-d, 24 blocks, 16 heads), 16 deformable heads, ratio 0.5, dpr 0.4."""
    return _entry("l", task, **overrides)


ENTRY_POINTS: dict[str, Callable[..., ViTAdapter]] = {
    "vit_adapter_t": vit_adapter_t,
    "vit_adapter_s": vit_adapter_s,
    "vit_adapter_b": vit_adapter_b,
    "vit_adapter_l": vit_adapter_l,
}
