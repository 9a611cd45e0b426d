"""Plain, self-describing checkpoints written atomically and read with ``weights_only=True``."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import torch

from adapterctl.errors import CheckpointError
from adapterctl.files import atomic_write, torch_load

_NAME = re.compile(r"^iter_(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename): a crash or a full disk mid-write
    leaves the previous file and no partial one; a failure is an ``OutputError`` naming the path."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint (.pt), or a converted model (.safetensors from ``adapterctl convert``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _load_converted(path)
    state = torch_load(path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(
            f"{path}: not an adapterctl checkpoint (no stored model and config: a bare state dict or another "
            "tool's file); official ViT-Adapter files go through `adapterctl convert`"
        )
    return state


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint ``resume`` can continue: it holds the optimizer, scheduler and scaler state and its step."""
    state = load_checkpoint(path)
    missing = [k for k in ("optimizer", "scheduler", "scaler") if k not in state]
    if missing or not isinstance(state.get("step"), int):
        raise CheckpointError(
            f"{path}: not a training checkpoint (no {', '.join(missing) or 'step'}): a converted or exported model "
            "can be evaluated, not resumed"
        )
    return state


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """``model.load_state_dict(weights)`` with one line naming the file and the first keys that do not fit."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise CheckpointError(
            f"{path}: its weights do not fit the model its config (with the overrides given) describes: {detail[:400]}"
        ) from None


def initialise_from(model: torch.nn.Module, path: str | Path) -> dict[str, list[str]]:
    """``load_from``: copy every tensor of ``path``'s model whose name and shape fit; returns what was
    ``reinitialised`` (shape differs), ``absent`` (not in the file) and ``unused`` (not in the model)."""
    weights = load_checkpoint(path)["model"]
    target = model.state_dict()
    fitting = {k: v for k, v in weights.items() if k in target and target[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    return {
        "reinitialised": sorted(k for k in weights if k in target and k not in fitting),
        "absent": sorted(k for k in target if k not in weights),
        "unused": sorted(k for k in weights if k not in target),
    }


def non_finite_tensors(*states: Any) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf in nested dicts/lists of tensors
    (a model's state dict, an optimizer's)."""
    bad: list[str] = []

    def walk(obj: Any, name: str) -> None:
        if torch.is_tensor(obj):
            if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
                bad.append(name)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}.{i}")

    for i, state in enumerate(states):
        walk(state, "" if i == 0 else f"<{i}>")
    return bad


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    """Keep the ``keep`` newest ``iter_*.pt`` files (``final.pt`` is never touched)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(directory)[:-keep]:
        path.unlink(missing_ok=True)


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"iter_{step:07d}.pt"


def _load_converted(path: Path) -> dict[str, Any]:
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for a malformed header
        raise CheckpointError(f"{path}: not a readable .safetensors file ({exc})") from None
    if meta.get("format") != "adapterctl" or "config" not in meta:
        raise CheckpointError(
            f"{path}: not an adapterctl file (convert official checkpoints with `adapterctl convert`)"
        )
    if meta.get("contents") not in ("segmentor", "detector"):
        raise CheckpointError(
            f"{path}: holds a {meta.get('contents', 'backbone')} only; evaluation needs a whole model"
        )
    return {"model": load_file(str(path)), "config": json.loads(meta["config"]), "step": None}
