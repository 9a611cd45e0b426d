"""Model entry points ``vit_adapter_{t,s,b,l}`` around one builder (``build_vit_adapter``), with the released
hyperparameters of ``variants.py``; ``task="detection"`` gives the detection copy (window attention, the final
ViT map; ``model.layout=detection`` in configs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

from torch import nn

from adapterctl.models.variants import model_kwargs
from adapterctl.models.vit_adapter import ViTAdapter

Task = Literal["segmentation", "detection"]


def variant_kwargs(size: str, task: Task = "segmentation") -> dict[str, Any]:
    """The full constructor arguments of ``build_vit_adapter`` for a released size."""
    return model_kwargs(size, task)


def build_from_config(size: str | None = None, layout: str = "segmentation", **given: Any) -> ViTAdapter:
    """The ``vit_adapter`` backbone family as configs describe it (``conf/model/``): a size, a layout, overrides."""
    return build_vit_adapter(**model_kwargs(size, layout, **given))


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
    vit_kwargs: dict[str, Any] | None = None,
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
        vit_kwargs: more ``timm.create_model`` arguments for a named ``vit`` (ignored otherwise).
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
        model = timm.create_model(vit, pretrained=False, img_size=img_size, **common, **(vit_kwargs or {}))
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


#: timm families under the adapter (not in the ViT-Adapter paper): timm name pattern, size names, pretraining
#: size. The adapter's own hyperparameters are the ViT-Adapter S/B/L ones (variants.VARIANTS).
TIMM_FAMILIES: dict[str, tuple[str, dict[str, str], int]] = {
    "dinov2": ("vit_{}_patch14_dinov2", {"s": "small", "b": "base", "l": "large"}, 518),
    "dinov2_reg4": ("vit_{}_patch14_reg4_dinov2", {"s": "small", "b": "base", "l": "large"}, 518),
    "dinov3": ("vit_{}_patch16_dinov3", {"s": "small", "b": "base", "l": "large"}, 256),
    "eva02": ("eva02_{}_patch14_224", {"s": "small", "b": "base", "l": "large"}, 224),
}


def timm_family_adapter(family: str, size: str, **overrides: Any) -> ViTAdapter:
    """A ViT-Adapter (segmentation layout) around a DINOv2 / DINOv3 / EVA-02 timm model of ``size`` s/b/l: the
    timm model at its own patch size and pretraining size, the adapter as ViT-Adapter-S/B/L. ``vit_kwargs`` go to
    ``timm.create_model`` (e.g. a smaller ``embed_dim``/``depth`` for tests)."""
    if family not in TIMM_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(TIMM_FAMILIES)}")
    pattern, sizes, img_size = TIMM_FAMILIES[family]
    if size not in sizes:
        raise ValueError(f"{family} has sizes {sorted(sizes)}, got {size!r}")
    kwargs = {**variant_kwargs(size), "vit": pattern.format(sizes[size]), "img_size": img_size, **overrides}
    return build_vit_adapter(**kwargs)


ENTRY_POINTS: dict[str, Callable[..., ViTAdapter]] = {
    "vit_adapter_t": vit_adapter_t,
    "vit_adapter_s": vit_adapter_s,
    "vit_adapter_b": vit_adapter_b,
    "vit_adapter_l": vit_adapter_l,
    **{
        f"{family}_adapter_{size}": partial(timm_family_adapter, family, size)
        for family in TIMM_FAMILIES
        for size in TIMM_FAMILIES[family][1]
    },
}
