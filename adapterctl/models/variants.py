"""The released ViT-Adapter sizes T/S/B/L: the one home of their constructor arguments (pure Python, no torch, so
that composing a config can expand a size cheaply).

The values are those of the official ADE20K UperNet configs (architecture.md §2.13, configs-and-results.md
§3.1); ``layout="detection"`` switches to the detection copy's window attention and ViT-feature form (§2.10).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

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
    freeze_vit=False,
    freeze_vit_dtype=None,
)


def _detection_windows(interaction_indexes: Sequence[Sequence[int]], depth: int) -> dict[str, Any]:
    """Window attention (14x14) on every block except the last of each interaction group (§2.13)."""
    global_blocks = {int(idx[-1]) for idx in interaction_indexes}
    return dict(
        window_attn=[i not in global_blocks for i in range(depth)],
        window_size=[None if i in global_blocks else 14 for i in range(depth)],
        vit_feature_mode="final",
    )


LAYOUTS = ("segmentation", "detection")


def model_kwargs(size: str | None = None, layout: str = "segmentation", **given: Any) -> dict[str, Any]:
    """The ``build_vit_adapter`` arguments a config describes: the released size's values (when ``size`` is set),
    then every given key that is not null. ``layout="detection"`` derives the detection copy's windows and ViT-map
    form from the final depth and interaction groups, unless they are given."""
    if size is not None and size not in VARIANTS:
        raise ValueError(f"unknown ViT-Adapter size {size!r}; choose one of {sorted(VARIANTS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    kwargs = {**COMMON, **copy.deepcopy(VARIANTS[size])} if size is not None else {}
    kwargs.update({k: v for k, v in given.items() if v is not None})
    if layout == "detection":
        depth = int(kwargs.get("depth", 12))
        groups = kwargs.get("interaction_indexes", ((0, 2), (3, 5), (6, 8), (9, 11)))
        derived = _detection_windows(groups, depth)
    else:
        derived = dict(window_attn=None, window_size=None, vit_feature_mode="per_interaction")
    return {**derived, **kwargs}


# BEiT-Adapter sizes (configs-and-results.md §3.2): BEiT-L as the official ADE20K / COCO-Stuff rows build it
BEIT_VARIANTS: dict[str, dict[str, Any]] = {
    "l": dict(
        img_size=640,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        mlp_ratio=4.0,
        qkv_bias=True,
        init_values=1e-6,
        drop_path_rate=0.3,
        use_shared_rel_pos_bias=False,
        interpolate_rel_pos=False,
        interaction_indexes=[[0, 5], [6, 11], [12, 17], [18, 23]],
        conv_inplane=64,
        n_points=4,
        deform_num_heads=16,
        deform_ratio=0.5,
        with_cffn=True,
        cffn_ratio=0.25,
        add_vit_feature=True,
        use_extra_extractor=True,
        with_cp=True,
        freeze_vit=False,
        freeze_vit_dtype=None,
    ),
    # BEiT-Adapter-B of the COCO-Stuff-10k / Pascal Context Mask2Former rows (with_cp unset there: off)
    "b": dict(
        img_size=512,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        init_values=1e-6,
        drop_path_rate=0.2,
        use_shared_rel_pos_bias=False,
        interpolate_rel_pos=False,
        interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]],
        conv_inplane=64,
        n_points=4,
        deform_num_heads=12,
        deform_ratio=0.5,
        with_cffn=True,
        cffn_ratio=0.25,
        add_vit_feature=True,
        use_extra_extractor=True,
        with_cp=False,
        freeze_vit=False,
        freeze_vit_dtype=None,
    ),
}


def beit_model_kwargs(size: str | None = None, layout: str = "segmentation", **given: Any) -> dict[str, Any]:
    """``build_beit_adapter`` arguments: a BEiT size's values, then every given key that is not null.
    ``layout="detection"`` is the official detection copy (HTC++): every block windowed, 14x14 windows and 56x56
    at the last block of each interaction group, no cls token, the final ViT map added to every output."""
    if size is not None and size not in BEIT_VARIANTS:
        raise ValueError(f"unknown BEiT-Adapter size {size!r}; choose one of {sorted(BEIT_VARIANTS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    kwargs = copy.deepcopy(BEIT_VARIANTS[size]) if size is not None else {}
    kwargs.update({k: v for k, v in given.items() if v is not None})
    if layout == "detection":
        depth = int(kwargs.get("depth", 24))
        groups = kwargs.get("interaction_indexes", ((0, 5), (6, 11), (12, 17), (18, 23)))
        ends = {int(g[-1]) for g in groups}
        derived = dict(
            window_attn=[True] * depth,
            window_size=[56 if i in ends else 14 for i in range(depth)],
            vit_feature_mode="final",
        )
        kwargs = {**derived, **kwargs}
    return kwargs


#: backbone family -> how a config with a ``size`` key expands into constructor arguments (``config.compose``
#: writes the expansion into the composed config, so runs and checkpoints hold every value explicitly)
SIZE_TABLES: dict[str, Callable[..., dict[str, Any]]] = {"vit_adapter": model_kwargs, "beit_adapter": beit_model_kwargs}
