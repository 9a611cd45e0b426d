"""Parameter and FLOP summaries of the model entry points (``adapterctl models``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ModelSummary:
    name: str
    total: int
    vit: int
    adapter: int
    gflops: float | None = None


def _cpu_sdpa_flops(query: torch.Size, key: torch.Size, value: torch.Size, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    # the counter hands over shapes, not tensors
    return sdpa_flop_count(query, key, value)


def count_flops(fn, model: nn.Module | None = None) -> int:
    """FLOPs (2 x multiply-adds) of calling ``fn()``, by torch.utils.flop_counter; grid_sample and the gather are
    not counted.

    torch's counter has no entry for the CPU flash-attention kernel; we count it with the SDPA formula so that
    attention is counted on every device. ``model``: its parameters stop requiring gradients while counting (the
    counter's module hooks fail on a view of a parameter made under ``no_grad``, e.g. Mask2Former's queries).
    """
    from torch.utils.flop_counter import FlopCounterMode

    custom = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        custom[cpu_sdpa] = _cpu_sdpa_flops
    params = [p for p in model.parameters() if p.requires_grad] if model is not None else []
    try:
        for p in params:
            p.requires_grad_(False)
        with FlopCounterMode(display=False, custom_mapping=custom) as counter:
            fn()
    finally:
        for p in params:
            p.requires_grad_(True)
    return counter.get_total_flops()


def count_gflops(model: nn.Module, input_size: int) -> float:
    """Forward GFLOPs of ``model`` (eval, no grad) on one ``input_size`` square image (:func:`count_flops`)."""
    model.eval()
    x = torch.zeros(1, 3, input_size, input_size)
    with torch.no_grad():
        return count_flops(lambda: model(x), model) / 1e9


def summarize(name: str, model: nn.Module, flops_size: int | None = None) -> ModelSummary:
    vit = sum(p.numel() for n, p in model.named_parameters() if n.startswith("vit."))
    total = sum(p.numel() for p in model.parameters())
    gflops = count_gflops(model, flops_size) if flops_size else None
    return ModelSummary(name, total, vit, total - vit, gflops)


def entry_points() -> dict:
    """Every backbone entry point: the ViT-Adapter sizes, BEiT-Adapter, and the timm families (DINOv2, DINOv3,
    EVA-02)."""
    from functools import partial

    from adapterctl.models.beit_adapter import build_from_config as beit
    from adapterctl.models.variants import BEIT_VARIANTS
    from adapterctl.models.zoo import ENTRY_POINTS

    return {**ENTRY_POINTS, **{f"beit_adapter_{s}": partial(beit, s) for s in BEIT_VARIANTS}}


def summarize_entry_points(flops_size: int | None = 512) -> list[ModelSummary]:
    """One summary per entry point; without a FLOP count the models are built on the meta device (no memory)."""
    out = []
    for name, fn in entry_points().items():
        if flops_size:
            out.append(summarize(name, fn(), flops_size))
        else:
            with torch.device("meta"):
                out.append(summarize(name, fn(), None))
    return out
