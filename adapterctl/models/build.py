"""Build a whole model from a composed config: backbone from ``model``, heads from ``head``, test mode from
``data.test``. Head input channels come from the backbone's ``feature_info``."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from adapterctl.errors import ConfigError
from adapterctl.models.beit_adapter import build_from_config as build_beit_from_config
from adapterctl.models.zoo import _resolve_norm, build_from_config
from adapterctl.registry import HeadEntry, OfficialHeads, Registry


def build_backbone(model_cfg: DictConfig | dict) -> nn.Module:
    """The backbone the ``model`` config describes, with its initial weights (no file is read: ``pretrained``
    says where a run's initial ViT weights come from, and ``run_train`` loads them)."""
    kwargs = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    kwargs.pop("pretrained", None)
    if "family" not in kwargs and "_target_" in kwargs:  # checkpoints written before the registry
        kwargs["family"] = {"adapterctl.models.zoo.build_vit_adapter": "vit_adapter"}.get(kwargs.pop("_target_"), "?")
    builder = BACKBONES.get(str(kwargs.pop("family", None)))
    try:
        return builder(**kwargs)
    except TypeError as exc:  # an unknown or missing keyword: name it as a config key
        raise ConfigError(f"model: {exc}".replace(f"{builder.__name__}() ", "")) from None


def _upernet(dec: dict, channels: list[int], head: DictConfig) -> nn.Module:
    from adapterctl.models.heads import UPerHead

    norm = _resolve_norm(head.get("norm_layer", "batchnorm"))
    return UPerHead(
        in_channels=[channels[i] for i in dec["in_index"]], num_classes=head.num_classes, norm_layer=norm,
        ignore_index=head.ignore_index, **dec,
    )  # fmt: skip


def _mask2former(dec: dict, channels: list[int], head: DictConfig) -> nn.Module:
    from adapterctl.models.heads.mask2former import Mask2FormerHead

    return Mask2FormerHead(in_channels=channels, num_classes=head.num_classes, ignore_index=head.ignore_index, **dec)


def _fcn(aux: dict, channels: list[int], head: DictConfig) -> nn.Module:
    from adapterctl.models.heads import FCNHead

    norm = _resolve_norm(head.get("norm_layer", "batchnorm"))
    return FCNHead(
        in_channels=channels[aux["in_index"]], num_classes=head.num_classes, norm_layer=norm,
        ignore_index=head.ignore_index, **aux,
    )  # fmt: skip


def _build_part(registry: Registry, part: DictConfig, where: str, channels: list[int], head: DictConfig) -> nn.Module:
    kwargs: dict[str, Any] = OmegaConf.to_container(part, resolve=True)
    builder = registry.get(str(kwargs.pop("name", None)))
    try:
        return builder(kwargs, channels, head)
    except TypeError as exc:  # an unknown or missing keyword: name it as a config key
        raise ConfigError(f"{where}: " + re.sub(r"^[\w.]*__init__\(\) ", "", str(exc))) from None


def build_segmentor(cfg: DictConfig, backbone: nn.Module | None = None) -> nn.Module:
    """An :class:`EncoderDecoder`: the decode head ``head.decode.name`` (``DECODE_HEADS``: upernet,
    mask2former) + an optional auxiliary head (``AUX_HEADS``: fcn) on the backbone's maps."""
    from adapterctl.models.segmentor import EncoderDecoder

    backbone = backbone if backbone is not None else build_backbone(cfg.model)
    channels = [f["num_chs"] for f in backbone.feature_info]
    head = cfg.head
    decode = _build_part(DECODE_HEADS, head.decode, "head.decode", channels, head)
    aux_head = None
    if head.get("auxiliary") is not None:
        aux_head = _build_part(AUX_HEADS, head.auxiliary, "head.auxiliary", channels, head)
    test = cfg.data.test
    return EncoderDecoder(
        backbone,
        decode,
        aux_head,
        mean=list(cfg.data.mean),
        std=list(cfg.data.std),
        test_mode=test.mode,
        crop_size=list(test.crop_size),
        stride=list(test.stride),
        aug_ratios=list(test.aug_ratios),
        aug_flip=bool(test.aug_flip),
        aug_mode=test.get("aug_mode", "whole"),
        pad_short_side=test.get("pad_short_side"),
    )


def _detector_kwargs(cfg: DictConfig, *widths: str) -> dict[str, Any]:
    """What every detector family reads from the config: normalisation, RPN and RoI sampling, the test-time
    thresholds, and the family's own ``widths`` (``head.<name>`` integers)."""
    head = cfg.head
    return {
        "image_mean": list(cfg.data.mean),
        "image_std": list(cfg.data.std),
        "rpn_post_nms_top_n_train": int(head.rpn_post_nms_top_n_train),
        "box_batch_size_per_image": int(head.get("box_batch_size_per_image", 512)),
        "box_score_thresh": float(head.score_thresh),
        "box_nms_thresh": float(head.nms_thresh),
        "box_detections_per_img": int(head.max_per_img),
        "mask_threshold": float(head.mask_threshold),
        **{name: int(head[name]) for name in widths},
    }


def build_detector(cfg: DictConfig, backbone: nn.Module | None = None) -> nn.Module:
    """ViT-Adapter (detection form) + FPN + Mask R-CNN heads as the official COCO configs (mmdet 2.22)."""
    from adapterctl.models.detector import AdapterMaskRCNN, DetBackbone

    body = backbone if backbone is not None else build_backbone(cfg.model)
    return AdapterMaskRCNN(
        DetBackbone(body, int(cfg.head.fpn_channels)), int(cfg.head.num_classes),
        **_detector_kwargs(cfg, "representation_size", "mask_channels"),
    )  # fmt: skip


def build_cascade_detector(cfg: DictConfig, backbone: nn.Module | None = None) -> nn.Module:
    """ViT-Adapter (detection form) + FPN + the ViT-Adapter Cascade Mask R-CNN heads (mmdet 2.22)."""
    from adapterctl.models.detector import AdapterCascadeMaskRCNN, DetBackbone

    body = backbone if backbone is not None else build_backbone(cfg.model)
    return AdapterCascadeMaskRCNN(
        DetBackbone(body, int(cfg.head.fpn_channels)), int(cfg.head.num_classes),
        **_detector_kwargs(cfg, "conv_channels", "fc_channels", "mask_channels"),
    )  # fmt: skip


def build_htc_detector(cfg: DictConfig, backbone: nn.Module | None = None) -> nn.Module:
    """ViT-Adapter (detection form) + ExtraAttention + FPN + the ViT-Adapter HTC++ heads (mmdet 2.22)."""
    from adapterctl.models.detector import AdapterHTC, HTCBackbone

    body = backbone if backbone is not None else build_backbone(cfg.model)
    head = cfg.head
    groups = head.get("fpn_norm_groups")
    neck = HTCBackbone(
        body, int(head.fpn_channels), num_heads=int(head.extra_attention_heads),
        drop_path=float(head.extra_attention_drop_path), norm_groups=int(groups) if groups else None,
    )  # fmt: skip
    return AdapterHTC(
        neck, int(head.num_classes), semantic_loss_weight=float(head.semantic_loss_weight),
        box_norm=bool(head.get("box_norm", False)), box_loss=str(head.get("box_loss", "smooth_l1")),
        **_detector_kwargs(cfg, "conv_channels", "fc_channels", "semantic_classes"),
    )  # fmt: skip


def _official(label: str, marks: tuple[str, ...], overrides: str, convert: str) -> OfficialHeads:
    """An :class:`OfficialHeads` whose functions live in ``adapterctl.models.detector`` (imported when used)."""

    def call(name: str):
        def fn(*args):
            from adapterctl.models import detector

            return getattr(detector, name)(*args)

        return fn

    return OfficialHeads(label, marks, call(overrides), call(convert))


BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone family", "model.family")
BACKBONES.register("vit_adapter", build_from_config)
BACKBONES.register("beit_adapter", build_beit_from_config)

DECODE_HEADS: Registry[Callable[..., nn.Module]] = Registry("decode head", "head.decode.name")
DECODE_HEADS.register("upernet", _upernet)
DECODE_HEADS.register("mask2former", _mask2former)
AUX_HEADS: Registry[Callable[..., nn.Module]] = Registry("auxiliary head", "head.auxiliary.name")
AUX_HEADS.register("fcn", _fcn)

HEADS: Registry[HeadEntry] = Registry("head", "head.name")
HEADS.register("upernet", HeadEntry(build_segmentor, tasks=("segmentation",)))
HEADS.register("mask2former", HeadEntry(build_segmentor, tasks=("segmentation",)))
HEADS.register(
    "maskrcnn",
    HeadEntry(
        build_detector,
        ("detection",),
        _official(
            "Mask R-CNN", ("roi_head.bbox_head.fc_cls.weight",), "mmdet_maskrcnn_overrides", "convert_mmdet_heads"
        ),
    ),
)
HEADS.register(
    "cascade_maskrcnn",
    HeadEntry(
        build_cascade_detector,
        ("detection",),
        _official(
            "Cascade Mask R-CNN",
            ("roi_head.bbox_head.0.fc_cls.weight", "roi_head.bbox_head.2.fc_cls.weight"),
            "mmdet_cascade_overrides",
            "convert_mmdet_cascade",
        ),
    ),
)
HEADS.register("htc", HeadEntry(build_htc_detector, ("detection",), _official(
    "HTC++", ("roi_head.bbox_head.0.fc_cls.weight", "roi_head.semantic_head.conv_logits.weight",
              "neck.0.attn.qkv.weight"),
    "mmdet_htc_overrides", "convert_mmdet_htc")))  # fmt: skip


def build_model(cfg: DictConfig) -> nn.Module:
    """The whole model of ``cfg``: the head family's builder (``HEADS``) around the backbone (``BACKBONES``)."""
    entry = HEADS.get(str(cfg.head.name))
    if cfg.task not in entry.tasks:
        serving = [name for name, e in HEADS.items() if cfg.task in e.tasks]
        raise ConfigError(
            f"task={cfg.task} needs head={' or head='.join(serving) or '?'}; head={cfg.head.name} serves "
            f"{', '.join(entry.tasks)} (the task follows the head: set head=, or use an experiment)"
        )
    return entry.build(cfg)


def checkpoint_config(state: dict, overrides: Sequence[str] = ()) -> DictConfig:
    """The config stored in a checkpoint with ``key=value`` / ``+key=value`` overrides merged in. The stored config
    keeps its interpolations, so ``data.root=/elsewhere`` (or ``$ADAPTERCTL_DATASETS``) moves every path under it."""
    import yaml

    cfg = OmegaConf.create(state["config"])
    _add_later_data_keys(cfg)
    OmegaConf.set_struct(cfg, True)
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if not sep:
            raise ConfigError(f"override '{ov}' is not key=value")
        if key.startswith("+"):
            OmegaConf.set_struct(cfg, False)
            key = key[1:]
        try:
            OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=True)
        except Exception as exc:  # omegaconf ConfigAttributeError / KeyValidationError
            raise ConfigError(f"override '{ov}' does not fit the checkpoint's config: {exc}".splitlines()[0]) from None
        OmegaConf.set_struct(cfg, True)
    return cfg


def _add_later_data_keys(cfg: DictConfig) -> None:
    """A checkpoint written before a ``data`` key existed (e.g. ``data.test.aug_scales``) gets that key's current
    value from its experiment (``conf/experiment/<experiment_name>.yaml``: an HTC++ row's ``_ms`` scales and size
    ranges) or else its data group (``conf/data/<data.name>.yaml``), so the key can be overridden; keys the
    checkpoint has are never touched."""
    from adapterctl.config import CONFIG_DIR, compose

    experiment, name = cfg.get("experiment_name"), cfg.get("data", {}).get("name")
    if experiment and (CONFIG_DIR / "experiment" / f"{experiment}.yaml").is_file():
        source = [f"experiment={experiment}"]
    elif name and (CONFIG_DIR / "data" / f"{name}.yaml").is_file():
        source = [f"data={name}"]
    else:
        return
    defaults = OmegaConf.to_container(compose("train", source).data, resolve=False)

    def fill(node: DictConfig, ref: dict) -> None:
        for key, value in ref.items():
            if key not in node:
                node[key] = value
            elif isinstance(value, dict) and isinstance(node.get(key), DictConfig):
                fill(node[key], value)

    fill(cfg.data, defaults)


def load_model_from_checkpoint(path: str | Path, overrides: Sequence[str] = ()) -> tuple[nn.Module, DictConfig, dict]:
    """``(model, config, state)`` from a training checkpoint or a converted ``.safetensors``, and nothing else: no
    pretrained file, no dataset. The one loader of ``eval``, ``export`` and ``predict``."""
    from adapterctl.engine.checkpoint import load_checkpoint, load_weights

    state = load_checkpoint(path)
    cfg = checkpoint_config(state, overrides)
    model = build_model(cfg)
    load_weights(model, state["model"], path)
    return model, cfg, state
