"""BEiT-Adapter (the official ``BEiTAdapter``): the ViT-Adapter around timm's ``Beit`` (BEiT and BEiTv2 weights),
driven by ``TimmBeitTrunk``. ``init_values`` sets both BEiT's layer scale and the injector's gamma."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

import adapterctl.models.trunks_beit  # noqa: F401 - registers the Beit trunk
from adapterctl.models.vit_adapter import ViTAdapter


def build_beit_adapter(
    *,
    img_size: int = 640,
    embed_dim: int = 1024,
    depth: int = 24,
    num_heads: int = 16,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    init_values: float = 1e-6,
    drop_path_rate: float = 0.3,
    use_shared_rel_pos_bias: bool = False,
    interpolate_rel_pos: bool = False,
    interaction_indexes: Sequence[Sequence[int]] = ((0, 5), (6, 11), (12, 17), (18, 23)),
    norm_layer: Callable[[int], nn.Module] | str = "batchnorm",
    **adapter_kwargs: Any,
) -> ViTAdapter:
    """A BEiT-Adapter: ``img_size`` fixes the relative-position window (``img_size // 16``), so it is the crop the
    model trains and infers at. No file is read (pretrained weights load through ``load_pretrained``)."""
    from timm.models.beit import Beit

    from adapterctl.models.zoo import _resolve_norm

    beit = Beit(
        img_size=img_size,
        patch_size=16,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        use_abs_pos_emb=False,
        use_rel_pos_bias=not use_shared_rel_pos_bias,
        use_shared_rel_pos_bias=use_shared_rel_pos_bias,
        init_values=init_values,
        drop_path_rate=drop_path_rate,
        num_classes=0,
        global_pool="",
    )
    beit.norm = nn.Identity()  # the official BEiTAdapter has no final norm
    adapter = ViTAdapter(
        beit,
        interaction_indexes=interaction_indexes,
        init_values=init_values,
        drop_path_rate=drop_path_rate,
        norm_layer=_resolve_norm(norm_layer),
        **adapter_kwargs,
    )
    adapter.trunk.interpolate_rel_pos = bool(interpolate_rel_pos)
    return adapter


def build_from_config(size: str | None = None, layout: str = "segmentation", **given: Any) -> ViTAdapter:
    """The ``beit_adapter`` backbone family as configs describe it (``conf/model/beit_adapter_*.yaml``)."""
    from adapterctl.models.variants import beit_model_kwargs

    return build_beit_adapter(**beit_model_kwargs(size, layout, **given))
