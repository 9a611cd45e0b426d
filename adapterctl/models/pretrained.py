"""Load pretrained plain-ViT weights (timm layout, DeiT / AugReg / JAX .npz) from a local file into a ViT.

Nothing is downloaded. The position embedding is resized to the model's pretraining grid, and a patch-14
kernel (DINOv2) is resampled to the model's patch size by timm's ``checkpoint_filter_fn``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from adapterctl.errors import CheckpointError
from adapterctl.files import torch_load

log = logging.getLogger(__name__)

# keys a classification checkpoint carries that a dense-prediction ViT does not use
_EXPECTED_UNUSED = ("cls_token", "norm.", "head.", "fc_norm.", "head_drop", "dist_token", "head_dist.")


@dataclass
class LoadReport:
    path: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.path}"]
        if self.missing:
            lines.append(f"missing (kept at init): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"unused: {', '.join(self.unexpected)}")
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read tensors from .pth/.pt/.bin/.tar (weights_only) or .safetensors; unwrap model/state_dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch_load(path)
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _npz_to_state_dict(vit: nn.Module, path: Path) -> dict[str, Tensor]:
    """Let timm read a JAX (.npz) checkpoint into a scratch plain ViT of the same shape."""
    from timm.models.vision_transformer import VisionTransformer

    first = vit.blocks[0]
    scratch = VisionTransformer(
        img_size=vit.patch_embed.img_size,
        patch_size=vit.patch_embed.patch_size,
        embed_dim=vit.embed_dim,
        depth=len(vit.blocks),
        num_heads=first.attn.num_heads,
        mlp_ratio=first.mlp.fc1.out_features / vit.embed_dim,
        qkv_bias=first.attn.qkv.bias is not None,
        num_classes=0,
        global_pool="",
        weight_init="skip",
    )
    scratch.load_pretrained(str(path))
    return scratch.state_dict()


def load_eva_weights(vit: nn.Module, path: str | Path, strict: bool = False) -> LoadReport:
    """:func:`load_vit_weights` for timm ``Eva`` models (DINOv3, EVA-02): their original layouts (DINOv3's
    ``storage_tokens``, EVA-02's MIM keys) go through timm's Eva ``checkpoint_filter_fn``."""
    from timm.models.eva import checkpoint_filter_fn

    return load_vit_weights(vit, path, strict, filter_fn=checkpoint_filter_fn)


def load_vit_weights(vit: nn.Module, path: str | Path, strict: bool = False, filter_fn=None) -> LoadReport:
    """Load timm-layout ViT weights into ``vit`` (a timm VisionTransformer, possibly inside a ViTAdapter).

    Returns what was loaded, what the model kept at init (e.g. layer-scale gammas absent from DeiT weights)
    and what the file carried that the model does not use (cls token, final norm, classifier).
    ``filter_fn``: the family's timm ``checkpoint_filter_fn`` (default: VisionTransformer's).
    """
    if filter_fn is None:
        from timm.models.vision_transformer import checkpoint_filter_fn as filter_fn

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    sd = _npz_to_state_dict(vit, path) if path.suffix == ".npz" else read_state_dict(path)
    # timm resamples pos_embed to the model's grid (keeping the cls slot) and patch kernels to its patch size
    sd = filter_fn(sd, vit)
    target = vit.state_dict()
    usable = {k: v for k, v in sd.items() if k in target and target[k].shape == v.shape}
    wrong_shape = [
        f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in sd.items()
        if k in target and target[k].shape != v.shape
    ]
    if wrong_shape:
        raise ValueError(f"{path}: tensors whose shape does not fit the model: {wrong_shape}")
    missing = sorted(set(target) - set(usable))
    unexpected = sorted(set(sd) - set(usable))
    if strict and (missing or [k for k in unexpected if not k.startswith(_EXPECTED_UNUSED)]):
        raise KeyError(f"{path}: missing {missing}, unexpected {unexpected}")
    vit.load_state_dict(usable, strict=False)
    report = LoadReport(str(path), len(usable), missing, unexpected)
    log.info("%s", report)
    return report


def load_pretrained(model: nn.Module, path: str | Path) -> list[LoadReport]:
    """Load a local timm-format ViT file into the plain ViT of every ViT-Adapter inside ``model`` (a backbone, a
    segmentor or a detector); returns one report each."""
    from adapterctl.models.vit_adapter import ViTAdapter

    adapters = [m for m in model.modules() if isinstance(m, ViTAdapter)]
    if not adapters:
        raise CheckpointError(f"model.pretrained={path}: this model holds no ViT-Adapter to load it into")
    return [a.trunk.load_pretrained(path) for a in adapters]  # each ViT family reads its own layouts
