"""Load checkpoints of the official ViT-Adapter code (czczup/ViT-Adapter) into adapterctl models.

The official backbone keys are ours with the ViT part under ``vit.`` and the layer scales renamed
(``blocks.i.gamma1`` -> ``vit.blocks.i.ls1.gamma``); every adapter key is identical.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from adapterctl.models.zoo import build_vit_adapter

# official ViTAdapter kwargs that build_vit_adapter takes under the same name
_SAME_NAME = (
    "img_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "drop_path_rate",
    "layer_scale",
    "window_attn",
    "window_size",
    "conv_inplane",
    "n_points",
    "deform_num_heads",
    "init_values",
    "interaction_indexes",
    "with_cffn",
    "cffn_ratio",
    "deform_ratio",
    "add_vit_feature",
    "use_extra_extractor",
    "with_cp",
)
# official kwargs with no effect on the network we build (or checked below)
_IGNORED = (
    "pretrained",
    "drop_rate",
    "attn_drop_rate",
    "in_chans",
    "patch_size",
    "pretrain_size",
    "norm_layer",
    "type",
    "use_cls",
    "freeze_vit",
    "pad_mode",
)
_VIT_PREFIXES = ("pos_embed", "cls_token", "patch_embed.", "blocks.")
_GAMMA = re.compile(r"^blocks\.(\d+)\.gamma([12])$")


@dataclass
class Conversion:
    """The result of mapping an official state dict onto adapterctl key names."""

    state_dict: dict[str, Tensor]
    unconverted: list[str] = field(default_factory=list)
    """Official keys with no place in the model (reported, never silently dropped)."""


def official_kwargs(config: Mapping[str, Any], variant: Literal["segmentation", "detection"]) -> dict[str, Any]:
    """Translate official ``ViTAdapter(**config)`` arguments into :func:`build_vit_adapter` arguments."""
    unknown = sorted(set(config) - set(_SAME_NAME) - set(_IGNORED))
    if unknown:
        raise ValueError(f"unknown official ViTAdapter arguments: {unknown}")
    if config.get("patch_size", 16) != 16:
        raise ValueError(f"official ViT-Adapter hard-codes 16x16 patches; config has patch_size={config['patch_size']}")
    img, pretrain = config.get("img_size", 224), config.get("pretrain_size", config.get("img_size", 224))
    if img != pretrain:
        raise ValueError(f"official ViT-Adapter needs img_size == pretrain_size, got {img} and {pretrain}")
    kwargs = {k: config[k] for k in _SAME_NAME if k in config}
    if kwargs.get("window_attn") is not None and not any(kwargs["window_attn"]):
        kwargs["window_attn"] = kwargs["window_size"] = None
    if variant not in ("segmentation", "detection"):
        raise ValueError(f"variant must be 'segmentation' or 'detection', got {variant!r}")
    kwargs["vit_feature_mode"] = "per_interaction" if variant == "segmentation" else "final"
    return kwargs


def unwrap_official(checkpoint: Mapping[str, Any], prefix: str | None = "backbone.") -> dict[str, Tensor]:
    """Strip ``state_dict``/``model``/``meta`` wrappers and, when present, ``prefix`` (keeping only its keys)."""
    sd: Mapping[str, Any] = checkpoint
    for key in ("state_dict", "model"):
        if key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
    if prefix and any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}


def convert_official_backbone(state_dict: Mapping[str, Tensor], model: nn.Module) -> Conversion:
    """Rename official backbone keys onto ``model`` (a :class:`ViTAdapter`), listing keys that do not fit."""
    target = model.state_dict()
    out: dict[str, Tensor] = {}
    unconverted: list[str] = []
    for key, value in state_dict.items():
        if key.endswith("relative_position_index"):  # structural (BEiT): the model builds its own; they must agree
            buffer = getattr(model.get_submodule("vit." + key.rsplit(".", 1)[0]), "relative_position_index", None)
            if buffer is None or not torch.equal(buffer, value):
                unconverted.append(key)
            continue
        m = _GAMMA.match(key)
        if m:
            new = f"vit.blocks.{m.group(1)}.ls{m.group(2)}.gamma"
        elif key.startswith(_VIT_PREFIXES):
            new = f"vit.{key}"
        else:
            new = key
        if new not in target or target[new].shape != value.shape:
            unconverted.append(key)
            continue
        out[new] = value
    return Conversion(out, unconverted)


def to_official_backbone(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`convert_official_backbone`: our backbone keys in the official layout."""
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"^vit\.blocks\.(\d+)\.ls([12])\.gamma$", key)
        if m:
            out[f"blocks.{m.group(1)}.gamma{m.group(2)}"] = value
        else:
            out[key.removeprefix("vit.")] = value
    return out


def from_official(
    config: Mapping[str, Any],
    state_dict: Mapping[str, Any] | None = None,
    variant: Literal["segmentation", "detection"] = "segmentation",
) -> nn.Module:
    """Build the backbone an official ``ViTAdapter(**config)`` describes and load its weights.

    Args:
        config: the official constructor keyword arguments.
        state_dict: an official-layout state dict: bare backbone keys, or a full mmseg/mmdet checkpoint
            (``state_dict``/``meta`` wrappers, ``backbone.`` prefix; head keys are ignored here).
        variant: ``"segmentation"`` or ``"detection"``, the copy of the class the weights come from; they
            differ only in how ViT features are added to the output maps.

    Returns:
        A :class:`~adapterctl.models.vit_adapter.ViTAdapter` whose forward returns the four maps (strides
        4-32). Raises ``KeyError`` when the weights miss parameters or carry ones that do not fit.
    """
    model = build_vit_adapter(**official_kwargs(config, variant))
    if state_dict is not None:
        conv = convert_official_backbone(unwrap_official(state_dict), model)
        if conv.unconverted:
            raise KeyError(f"official keys that do not fit this model: {conv.unconverted}")
        missing = sorted(set(model.state_dict()) - set(conv.state_dict))
        if missing:
            raise KeyError(f"official state dict lacks: {missing}")
        model.load_state_dict(conv.state_dict, strict=True)
    return model


def load_checkpoint_file(path: str) -> dict[str, Any]:
    """Read a checkpoint safely (tensors and plain containers only; mmcv ``meta`` blocks are fine).

    The ``.zip`` archives of the official release (a folder holding one ``.pth``) are opened too: the one
    checkpoint inside is read without unpacking the rest.
    """
    from adapterctl.errors import CheckpointError
    from adapterctl.files import torch_load

    inner = _release_archive_member(path)
    if inner is not None:
        import tempfile
        import zipfile

        with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory(prefix="adapterctl-") as tmp:
            try:
                extracted = archive.extract(inner, tmp)
            except (OSError, zipfile.BadZipFile) as exc:
                raise CheckpointError(f"{path}: cannot read {inner} from the archive ({exc})") from None
            obj = torch_load(extracted, safe_globals=[torch.torch_version.TorchVersion])
    else:
        obj = torch_load(path, safe_globals=[torch.torch_version.TorchVersion])
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def _release_archive_member(path: str) -> str | None:
    """The checkpoint inside a release ``.zip``; ``None`` for anything else (a torch file is itself a zip, told
    apart by its ``data.pkl``)."""
    import zipfile

    from adapterctl.errors import CheckpointError

    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = [i.filename for i in archive.infolist() if not i.is_dir()]
    if any(n.endswith("data.pkl") for n in names):
        return None
    found = [n for n in names if n.endswith((".pth", ".pth.tar", ".pt", ".bin")) and "__MACOSX" not in n]
    if len(found) != 1:
        listing = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        raise CheckpointError(
            f"{path}: a zip archive with {len(found) or 'no'} checkpoint files (.pth/.pth.tar/.pt) in it; "
            f"expected one. It holds: {listing or 'nothing'}"
        )
    return found[0]
