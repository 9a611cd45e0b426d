"""Registries: every family is named in one place; an unknown name lists the valid ones; a new head family is
one module, its config and a registry line (shown here with a toy head)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from typer.testing import CliRunner

from adapterctl.cli import app
from adapterctl.config import compose
from adapterctl.errors import ConfigError
from adapterctl.experiments import list_experiments
from adapterctl.models import build
from adapterctl.models.heads.common import SemanticHead
from adapterctl.registry import HeadEntry

from .conftest import TINY_MODEL

runner = CliRunner()


def test_the_task_follows_the_head():
    assert compose("train", []).task == "segmentation"
    assert compose("train", ["head=maskrcnn", "data=synthetic_det"]).task == "detection"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (
            "head.name=uppernet",
            "head.name=uppernet: unknown head. Did you mean 'upernet'? Valid: upernet, mask2former, maskrcnn",
        ),
        ("model.family=vit_adaptr", "model.family=vit_adaptr: unknown backbone family. Did you mean 'vit_adapter'?"),
        ("task=panoptic", "task=panoptic: unknown task. Valid: segmentation, detection"),
    ],
)
def test_unknown_names_list_the_registered_ones(tmp_path, override, needle):
    result = runner.invoke(app, ["train", *TINY_MODEL, override, f"paths.output_dir={tmp_path / 'r'}"])
    assert result.exit_code == 2 and needle in result.output.replace("\n", ""), result.output


class _ToyHead(SemanticHead):
    """A 1x1 classifier on the stride-8 map: the whole of a new semantic head family."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(loss_name="loss_toy")
        self.num_classes = num_classes
        self.conv_seg = torch.nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, features):
        return self.conv_seg(features[1])


def _build_toy(cfg, backbone=None):
    from adapterctl.models.segmentor import EncoderDecoder

    backbone = backbone or build.build_backbone(cfg.model)
    head = _ToyHead(backbone.feature_info[1]["num_chs"], int(cfg.head.num_classes))
    return EncoderDecoder(backbone, head, mean=list(cfg.data.mean), std=list(cfg.data.std))


def test_a_new_head_family_is_a_registry_line(monkeypatch):
    monkeypatch.setattr(build.HEADS, "_entries", dict(build.HEADS._entries))  # keep the registry as it was
    build.HEADS.register("toy", HeadEntry(_build_toy, tasks=("segmentation",)))
    cfg = compose("train", TINY_MODEL)
    cfg.head = OmegaConf.create({"name": "toy", "task": "segmentation", "num_classes": 8})
    model = build.build_model(cfg)
    out = model(torch.rand(2, 3, 64, 64) * 255, torch.randint(0, 8, (2, 64, 64)))
    assert set(out) == {"loss_toy", "acc_seg"}
    assert model.predict(torch.rand(1, 3, 64, 64) * 255).shape == (1, 8, 64, 64)
    cfg.task = "detection"
    serving = r"task=detection needs head=maskrcnn( or head=\w+)*; head=toy serves segmentation"
    with pytest.raises(ConfigError, match=serving):
        build.build_model(cfg)


@pytest.mark.parametrize("name", [r["name"] for r in list_experiments()])
def test_every_experiment_builds(name):
    """Every experiment composes and instantiates at full size (on the meta device: no memory, no weights)."""
    cfg = compose("train", [f"experiment={name}"])
    with torch.device("meta"):
        model = build.build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
