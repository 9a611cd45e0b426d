"""``adapterctl convert``: official ViT-Adapter checkpoints -> adapterctl safetensors files.

A backbone-only file, a full mmseg UperNet checkpoint (``backbone.*`` + ``decode_head.*`` +
``auxiliary_head.*``) or a Mask2Former one (also inside the release's ``.zip``), or an mmdet detector one (the
head registry entries with ``official`` marks: Mask R-CNN, Cascade Mask R-CNN): the head modules carry the
official names, so their keys map 1:1 or by the family's table. The output holds the
model's tensors and, in its metadata, the composed config, so ``adapterctl eval ckpt=FILE.safetensors`` works
from it alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from adapterctl.errors import CheckpointError
from adapterctl.files import atomic_write
from adapterctl.models.official import convert_official_backbone, load_checkpoint_file, unwrap_official
from adapterctl.registry import OfficialHeads

_HEADS = ("decode_head.", "auxiliary_head.")
_DET_HEADS = ("neck.", "rpn_head.", "roi_head.")


class ConversionError(CheckpointError):
    """The checkpoint does not fit the chosen model."""


def _mask2former_overrides(full: dict[str, Tensor]) -> list[str]:
    """Head family, widths, depths, queries and class count read off an official Mask2Former state dict (the
    heads of both transformers: from the MSDA offsets, heads x 3 levels x 4 points x 2)."""
    feat = full["decode_head.query_feat.weight"]
    cls = full["decode_head.cls_embed.weight"]
    prefix = "decode_head.pixel_decoder.encoder.layers."
    enc = {k[len(prefix) :].split(".")[0] for k in full if k.startswith(prefix)}
    prefix = "decode_head.transformer_decoder.layers."
    dec = {k[len(prefix) :].split(".")[0] for k in full if k.startswith(prefix)}
    offsets = full.get("decode_head.pixel_decoder.encoder.layers.0.attentions.0.sampling_offsets.weight")
    ffn = full.get("decode_head.transformer_decoder.layers.0.ffns.0.layers.0.0.weight")
    out = [
        "head=mask2former",
        f"head.num_classes={cls.shape[0] - 1}",
        f"data.num_classes={cls.shape[0] - 1}",
        f"head.decode.feat_channels={feat.shape[1]}",
        f"head.decode.num_queries={feat.shape[0]}",
        f"head.decode.enc_layers={len(enc)}",
        f"head.decode.dec_layers={len(dec)}",
    ]
    if offsets is not None and offsets.shape[0] % 24 == 0:
        out.append(f"head.decode.num_heads={offsets.shape[0] // 24}")
    if ffn is not None:
        out.append(f"head.decode.ffn_channels={ffn.shape[0]}")
    enc_ffn = full.get("decode_head.pixel_decoder.encoder.layers.0.ffns.0.layers.0.0.weight")
    if enc_ffn is not None and (ffn is None or enc_ffn.shape[0] != ffn.shape[0]):
        out.append(f"head.decode.enc_ffn_channels={enc_ffn.shape[0]}")
    return out


def _beit_overrides(full: dict[str, Tensor]) -> list[str]:
    """``model.img_size`` from the relative-position table of block 0 ((2W - 1)^2 + 3 rows for a W x W window)."""
    table = full.get("backbone.blocks.0.attn.relative_position_bias_table")
    if table is None:
        return []
    side = (math.isqrt(table.shape[0] - 3) + 1) // 2
    return [f"model.img_size={16 * side}"] if (2 * side - 1) ** 2 + 3 == table.shape[0] else []


def _head_overrides(full: dict[str, Tensor]) -> list[str]:
    """Head widths and class count read off an mmseg UperNet (or Mask2Former) state dict."""
    if "decode_head.query_feat.weight" in full:
        return _mask2former_overrides(full)
    out = []
    seg = full.get("decode_head.conv_seg.weight")
    if seg is not None:
        out += [
            f"head.num_classes={seg.shape[0]}",
            f"head.decode.channels={seg.shape[1]}",
            f"data.num_classes={seg.shape[0]}",
        ]
    aux = full.get("auxiliary_head.conv_seg.weight")
    if aux is not None:
        out.append(f"head.auxiliary.channels={aux.shape[1]}")
    return out


def _detector_family(full: dict[str, Tensor]) -> tuple[str, OfficialHeads]:
    """The head registry entry whose official marks all appear in ``full`` (the most specific one)."""
    from adapterctl.models.build import HEADS

    found = [(name, e.official) for name, e in HEADS.items() if e.official and all(k in full for k in e.official.marks)]
    if not found:
        known = ", ".join(e.official.label for _, e in HEADS.items() if e.official)
        raise ConversionError(f"the detector heads of this checkpoint are none of: {known}")
    return max(found, key=lambda item: len(item[1].marks))


def take_ema(full: dict[str, Tensor], use_ema: bool, src: Path) -> tuple[dict[str, Tensor], str | None]:
    """mmdet's ``EMAHook`` (the HTC++ Objects365 config's ``ExpMomentumEMAHook``) registers a copy of every
    state-dict entry as a buffer ``ema_<name, dots as underscores>``, so its checkpoints carry both. Returns the
    state dict to convert (the trained entries, or with ``use_ema`` the averaged ones in their place) and a
    report line. Under mmcv's ``IterBasedRunner`` the hook never swaps the averages in (it swaps on train
    epochs, which that runner does not call), so the official evaluation used the trained entries: the default.
    """
    ema = {k: v for k, v in full.items() if k.startswith("ema_")}
    if not ema:
        if use_ema:
            raise ConversionError(f"--ema: {src} holds no ema_* buffers (an mmdet EMAHook's averages)")
        return full, None
    rest = {k: v for k, v in full.items() if not k.startswith("ema_")}
    if not use_ema:
        return rest, (
            f"skipped {len(ema)} ema_* buffers (mmdet EMAHook averages; the official evaluation used the trained "
            "weights); --ema converts the averages instead"
        )
    missing = [k for k in rest if "ema_" + k.replace(".", "_") not in ema]
    if missing:
        raise ConversionError(f"--ema: {src} has no average for {len(missing)} entries (first: {missing[:3]})")
    return {
        k: ema["ema_" + k.replace(".", "_")] for k in rest
    }, f"converted the EMA averages ({len(ema)} ema_* buffers)"


def run_convert(
    src: str | Path,
    dst: str | Path,
    model: str = "vit_adapter_t",
    variant: str = "segmentation",
    overrides: Sequence[str] = (),
    ema: bool = False,
) -> str:
    """Convert ``src`` for ``conf/model/<model>.yaml`` (+ overrides) and write ``dst``; returns a report.

    Official keys that do not fit are listed in the report (and a model tensor without a counterpart is an
    error), never silently dropped. ``ema``: an mmdet EMAHook checkpoint's averaged weights (:func:`take_ema`).
    """
    from omegaconf import OmegaConf
    from safetensors.torch import save

    from adapterctl.config import compose
    from adapterctl.models.build import build_backbone, build_segmentor

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    if dst.suffix != ".safetensors":
        raise ValueError(f"output must be a .safetensors file, got {dst}")
    if variant not in ("segmentation", "detection"):
        raise ValueError(f"--variant must be segmentation or detection, got {variant!r}")
    raw = load_checkpoint_file(str(src))
    full, ema_note = take_ema(unwrap_official(raw, prefix=None), ema, src)
    raw = {"state_dict": full}
    has_heads = variant == "segmentation" and any(k.startswith("decode_head.") for k in full)
    det_heads = variant == "detection" and any(k.startswith(_DET_HEADS) for k in full)
    head_overrides = _head_overrides(full) if has_heads else []
    if det_heads:
        det_name, det = _detector_family(full)
        head_overrides = [f"head={det_name}", *det.overrides(full)]
    family = str(compose("train", [f"model={model}"]).model.family)
    if family == "vit_adapter":  # which official copy of the class: segmentation or detection outputs
        mode = "per_interaction" if variant == "segmentation" else "final"
        head_overrides.insert(0, f"model.vit_feature_mode={mode}")
    elif family == "beit_adapter" and variant == "detection":  # the official detection copy (HTC++)
        head_overrides.insert(0, "model.layout=detection")
    elif variant != "segmentation":
        raise ConversionError(f"--variant {variant}: model '{model}' ({family}) converts segmentation checkpoints only")
    if family == "beit_adapter":
        head_overrides += _beit_overrides(full)
    cfg = compose("train", [f"model={model}", *head_overrides, *overrides])
    backbone = build_backbone(cfg.model)
    conv = convert_official_backbone(unwrap_official(raw, prefix="backbone."), backbone)
    missing = sorted(set(backbone.state_dict()) - set(conv.state_dict))
    if missing:
        raise ConversionError(
            f"{src} does not fit model '{model}': {len(missing)} model tensors have no counterpart "
            f"(first: {missing[:5]}); unconverted checkpoint keys: {conv.unconverted[:10]}"
        )
    body = "backbone.body." if det_heads else "backbone."  # the detector holds the ViT-Adapter under its FPN
    tensors = {f"{body}{k}": v for k, v in conv.state_dict.items()}
    unconverted = [f"backbone.{k}" for k in conv.unconverted]
    if det_heads:
        from adapterctl.models.build import HEADS

        net = HEADS.get(str(cfg.head.name)).build(cfg, backbone=backbone)
        heads, _left = det.convert({k: v for k, v in full.items() if k.startswith(_DET_HEADS)})
        target = net.state_dict()
        for key, value in heads.items():
            if key in target and target[key].shape == value.shape:
                tensors[key] = value
            else:
                unconverted.append(key)
        unconverted += _left
        lacking = sorted(k for k in target if k not in tensors)
        if lacking:
            raise ConversionError(f"{src}: detector tensors missing for this config: {lacking[:5]}")
    if has_heads:
        net = build_segmentor(cfg, backbone=backbone)
        target = net.state_dict()
        for key, value in full.items():
            if not key.startswith(_HEADS):
                continue
            if key in target and target[key].shape == value.shape:
                tensors[key] = value
            else:
                unconverted.append(key)
        lacking = sorted(k for k in target if k.startswith(_HEADS) and k not in tensors)
        if lacking:
            raise ConversionError(f"{src}: head tensors missing for this config: {lacking[:5]}")
    covered = ("backbone.", *(_HEADS if has_heads else ()), *(_DET_HEADS if det_heads else ()))
    others = sorted(k for k in full if not k.startswith(covered))
    if not any(k.startswith("backbone.") for k in full):
        others = []  # a bare backbone state dict: every key was offered to the backbone
    config = OmegaConf.to_container(cfg, resolve=True)
    config["trainer"]["amp"] = "none"  # the official code evaluates in fp32
    meta = {
        "format": "adapterctl",
        "source": str(src),
        "variant": variant,
        "contents": "segmentor" if has_heads else "detector" if det_heads else "backbone",
        "config": json.dumps(config),
    }
    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
    atomic_write(dst, lambda f: f.write(blob))
    head_name = "Mask2Former" if str(cfg.head.name) == "mask2former" else "UperNet + FCN"
    what = (
        f"segmentor (backbone + {head_name})"
        if has_heads
        else f"detector (backbone + FPN + {det.label})"
        if det_heads
        else "backbone"
    )
    lines = [f"wrote {len(tensors)} {what} tensors to {dst}", *([ema_note] if ema_note else [])]
    if unconverted:
        lines.append(f"keys not converted ({len(unconverted)}): {', '.join(unconverted)}")
    if others:
        lines.append(f"keys not converted ({len(others)}; not part of a {variant} {what}): {', '.join(others)}")
    return "\n".join(lines)
