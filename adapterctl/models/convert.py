"""``adapterctl convert``: official ViT-Adapter checkpoints -> adapterctl safetensors files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from adapterctl.models.official import convert_official_backbone, load_checkpoint_file, unwrap_official


class ConversionError(RuntimeError):
    """The checkpoint does not fit the chosen model."""


def run_convert(
    src: str | Path,
    dst: str | Path,
    model: str = "vit_adapter_t",
    variant: str = "segmentation",
    overrides: Sequence[str] = (),
) -> str:
    """Convert ``src`` for the model config ``conf/model/<model>.yaml`` (+ overrides) and write ``dst``.

    The output holds the backbone under ``backbone.``; official keys that do not fit are reported. Returns a
    human-readable report.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from adapterctl.config import compose

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    if dst.suffix != ".safetensors":
        raise ValueError(f"output must be a .safetensors file, got {dst}")
    if variant not in ("segmentation", "detection"):
        raise ValueError(f"--variant must be segmentation or detection, got {variant!r}")
    mode = "per_interaction" if variant == "segmentation" else "final"
    cfg = compose("train", [f"model={model}", f"model.vit_feature_mode={mode}", *overrides])
    net = instantiate(cfg.model)
    raw = load_checkpoint_file(str(src))
    backbone = unwrap_official(raw, prefix="backbone.")
    conv = convert_official_backbone(backbone, net)
    missing = sorted(set(net.state_dict()) - set(conv.state_dict))
    if missing:
        raise ConversionError(
            f"{src} does not fit model '{model}': {len(missing)} model tensors have no counterpart "
            f"(first: {missing[:5]}); unconverted checkpoint keys: {conv.unconverted[:10]}"
        )
    full = unwrap_official(raw, prefix=None)
    others = sorted(k for k in full if not k.startswith("backbone.")) if len(full) > len(backbone) else []
    tensors = {f"backbone.{k}": v.contiguous() for k, v in conv.state_dict.items()}
    meta = {
        "format": "adapterctl",
        "source": str(src),
        "variant": variant,
        "model_config": json.dumps(OmegaConf.to_container(cfg.model, resolve=True)),
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(dst)
    lines = [f"wrote {len(tensors)} backbone tensors to {dst}"]
    if conv.unconverted:
        lines.append(f"backbone keys not converted ({len(conv.unconverted)}): {', '.join(conv.unconverted)}")
    if others:
        lines.append(
            f"non-backbone keys not converted ({len(others)}; heads are converted by their own task): "
            + ", ".join(others)
        )
    return "\n".join(lines)
