"""The command line and the config tree: help, composition, overrides and the bad-override messages."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from adapterctl.cli import app
from adapterctl.config import CONFIG_DIR, ConfigError, compose, config_groups, save_config

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("config", "models", "convert", "bench"):
        assert command in result.output
    assert "Hydra" in result.output


def test_config_prints_resolved_yaml_with_overrides():
    result = runner.invoke(app, ["config", "model=vit_adapter_s", "trainer.max_iters=100", "+extra.key=1"])
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.output)
    assert cfg["model"]["embed_dim"] == 384
    assert cfg["trainer"]["max_iters"] == 100
    assert cfg["extra"] == {"key": 1}
    assert "${" not in result.output  # resolved


def test_config_selects_root_config():
    result = runner.invoke(app, ["config", "--config", "export", "ckpt=/x.pt"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["ckpt"] == "/x.pt"


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        (
            "trainer.max_iterz=3",
            ["trainer.max_iterz", "Did you mean 'max_iters'", "batch_size", "+trainer.max_iterz"],
        ),
        (
            "model=vit_adapter_x",
            ["vit_adapter_x", "'model'", "vit_adapter_b, vit_adapter_l, vit_adapter_s, vit_adapter_t"],
        ),
        ("modle=vit_adapter_t", ["modle", "Did you mean 'model'", "Config groups"]),
        ("trainer.max_iters.foo=3", ["trainer.max_iters", "is a value"]),
        ("trainer.max_iters=[1", ["Malformed override"]),
        ("experiment=nope", ["nope", "'experiment'"]),
    ],
)
def test_bad_overrides_exit_2_with_a_named_message(override, needles):
    result = runner.invoke(app, ["config", override])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, (needle, result.output)


def test_missing_mandatory_value_is_named():
    with pytest.raises(ConfigError, match="'ckpt' must be set"):
        compose("eval")


def test_unknown_root_config():
    with pytest.raises(ConfigError, match="Valid configs: train, eval, export"):
        compose("trian")


def _all_group_options():
    return [(g, o) for g, options in config_groups().items() for o in options]


@pytest.mark.parametrize(("group", "option"), _all_group_options())
def test_every_config_file_composes(group, option):
    cfg = compose("train", [f"{group}={option}"])
    assert cfg is not None


@pytest.mark.parametrize("name", ["train", "eval", "export"])
def test_root_configs_compose(name):
    overrides = [] if name == "train" else ["ckpt=/some/ckpt.pt"]
    assert compose(name, overrides) is not None


def test_no_config_uses_hydra_interpolations():
    for path in CONFIG_DIR.rglob("*.yaml"):
        assert "${hydra:" not in path.read_text(), path


def test_model_configs_equal_the_zoo_entry_points():
    """The sizes live in one place (variants.VARIANTS): a model YAML names a size and repeats none of its values;
    the composed config holds them all (for config.yaml and checkpoints), windows derived for the detection copy."""
    from adapterctl.models.zoo import variant_kwargs

    skip = ("family", "size", "layout", "pretrained", "norm_layer", "vit")
    for size in "tsbl":
        cfg = compose("train", [f"model=vit_adapter_{size}"])
        assert {k: v for k, v in _plain(cfg.model).items() if k not in skip} == variant_kwargs(size), size
        own = yaml.safe_load((CONFIG_DIR / "model" / f"vit_adapter_{size}.yaml").read_text())
        assert set(own) == {"defaults", "size"}, own
    base = yaml.safe_load((CONFIG_DIR / "model" / "_vit_adapter.yaml").read_text())
    assert all(v is None for k, v in base.items() if k not in skip), base
    detection = compose("train", ["model=vit_adapter_l", "model.layout=detection", "model.drop_path_rate=0.5"])
    assert {k: v for k, v in _plain(detection.model).items() if k not in skip} == {
        **variant_kwargs("l", "detection"),
        "drop_path_rate": 0.5,
    }
    tiny = compose(
        "train", ["model.depth=4", "model.interaction_indexes=[[0,0],[1,1],[2,2],[3,3]]", "model.layout=detection"]
    )
    assert list(tiny.model.window_attn) == [False] * 4  # derived from the overridden groups: every block is last


def _plain(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


@pytest.mark.parametrize("size", ["t", "s"])
def test_model_config_instantiates(size):
    import torch

    from adapterctl.models.build import build_backbone

    cfg = compose("train", [f"model=vit_adapter_{size}", "model.img_size=64"])
    model = build_backbone(cfg.model).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2]


def test_run_dir_is_fixed_at_compose_time_and_config_saved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose("train", ["experiment_name=demo"], run_dir=True)
    assert cfg.paths.output_dir.startswith("runs/demo/")
    path = save_config(cfg, cfg.paths.output_dir)
    assert yaml.safe_load(path.read_text())["experiment_name"] == "demo"
    chosen = compose("train", [f"paths.output_dir={tmp_path}/mine"], run_dir=True)
    assert chosen.paths.output_dir == f"{tmp_path}/mine"


def test_models_command_lists_entry_points_and_counts():
    result = runner.invoke(app, ["models", "--no-flops"])
    assert result.exit_code == 0, result.output
    for name, adapter in (("vit_adapter_t", "2,438,192"), ("vit_adapter_l", "23,236,800")):
        assert name in result.output and adapter in result.output
