"""AdamW with the official layer-wise lr decay groups, and the poly schedule with linear warmup.

Layer decay follows ViT-Adapter's ``LayerDecayOptimizerConstructor`` (architecture.md §2.14): with L blocks,
patch/pos embedding get rate^(L+1), block i gets rate^(L-i), everything else (the adapter, the heads) gets 1.
Weight decay is 0 for 1-D parameters and biases (and for names containing any of ``no_decay_keys``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

_BLOCK = re.compile(r"(?:^|\.)vit\.blocks\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)vit\.(pos_embed|cls_token|reg_token|patch_embed)")
# The official id map also puts Mask2Former's query/level embeddings and its class/mask embeddings in layer 0
# (so at rate^(L+1) of the lr): kept for reproduction; optim=adamw_mask2former is the Mask2Former recipe instead.
_HEAD_EMBED = re.compile(r"^decode_head\.(mask_embed|cls_embed|level_embed|query_embed|query_feat)\.")


def layer_id(name: str, num_layers: int) -> int:
    """0 for the ViT embeddings (and Mask2Former's embeddings, as the official map), i + 1 for ViT block i,
    ``num_layers - 1`` for the rest."""
    if _EMBED.search(name) or _HEAD_EMBED.match(name):
        return 0
    m = _BLOCK.search(name)
    if m:
        return int(m.group(1)) + 1
    return num_layers - 1


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay_rate: float = 1.0,
    depth: int | None = None,
    no_decay_keys: Sequence[str] = (),
    lr_mult: Mapping[str, float] | None = None,
) -> list[dict]:
    """Parameter groups with ``lr`` = base lr x layer scale x lr_mult and the right weight decay."""
    if depth is None:
        depth = max((int(m.group(1)) for n, _ in model.named_parameters() if (m := _BLOCK.search(n))), default=-1) + 1
    num_layers = depth + 2
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith(".bias") or any(k in name for k in no_decay_keys)
        lid = layer_id(name, num_layers)
        scale = layer_decay_rate ** (num_layers - lid - 1)
        mult = 1.0
        for key, value in (lr_mult or {}).items():
            if key in name:
                mult *= float(value)
        key = (lid, no_decay, mult)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr": lr * scale * mult,
                "lr_scale": scale * mult,
                "layer_id": lid,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: Mapping) -> torch.optim.Optimizer:
    if cfg.get("name", "adamw") != "adamw":
        raise ValueError(f"optim.name: only 'adamw' is available, got {cfg['name']!r}")
    groups = param_groups(
        model,
        lr=float(cfg["lr"]),
        weight_decay=float(cfg["weight_decay"]),
        layer_decay_rate=float(cfg.get("layer_decay_rate", 1.0)),
        no_decay_keys=list(cfg.get("no_decay_keys", [])),
        lr_mult=dict(cfg.get("lr_mult") or {}),
    )
    for g in groups:
        g.pop("names")
    return torch.optim.AdamW(
        groups,
        lr=float(cfg["lr"]),
        betas=tuple(cfg.get("betas", (0.9, 0.999))),
        weight_decay=float(cfg["weight_decay"]),
    )


def poly_warmup_factor(
    step: int,
    max_iters: int,
    power: float = 1.0,
    min_lr_ratio: float = 0.0,
    warmup_iters: int = 0,
    warmup_ratio: float = 1e-6,
) -> float:
    """mmcv PolyLrUpdaterHook with linear warmup, as a multiplier of the base lr at ``step``."""
    progress = min(step, max_iters) / max_iters
    factor = (1.0 - min_lr_ratio) * (1.0 - progress) ** power + min_lr_ratio
    if step < warmup_iters:
        k = (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
        factor *= 1.0 - k
    return factor


def step_warmup_factor(
    step: int, milestones: Sequence[int], gamma: float = 0.1, warmup_iters: int = 0, warmup_ratio: float = 0.001
) -> float:
    """mmcv StepLrUpdaterHook with linear warmup (the mmdet 1x/3x schedules), as a multiplier of the base lr."""
    factor = gamma ** sum(step >= m for m in milestones)
    if step < warmup_iters:
        factor *= 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, sched_cfg: Mapping, max_iters: int, base_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    name = sched_cfg.get("name", "poly")
    if name == "step":
        milestones = [int(m) for m in sched_cfg.get("milestones", [])]
        gamma = float(sched_cfg.get("gamma", 0.1))
        warmup = int(sched_cfg.get("warmup_iters", 0))
        ratio = float(sched_cfg.get("warmup_ratio", 0.001))
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: step_warmup_factor(step, milestones, gamma, warmup, ratio)
        )
    if name != "poly":
        raise ValueError(f"schedule.name must be poly or step, got {name!r}")
    min_ratio = float(sched_cfg.get("min_lr", 0.0)) / base_lr if base_lr else 0.0
    power = float(sched_cfg.get("power", 1.0))
    warmup = int(sched_cfg.get("warmup_iters", 0))
    ratio = float(sched_cfg.get("warmup_ratio", 1e-6))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: poly_warmup_factor(step, max_iters, power, min_ratio, warmup, ratio)
    )
