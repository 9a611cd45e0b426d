"""Activation checkpointing that switches itself off where it cannot help (no gradient needed)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils.checkpoint as cp
from torch import Tensor


def checkpointed(fn: Callable[..., Tensor], *args, enabled: bool) -> Tensor:
    """Run ``fn`` under activation checkpointing when ``enabled`` and some input needs a gradient."""
    if enabled and torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return cp.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
