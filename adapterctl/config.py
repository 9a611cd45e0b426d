"""Compose configs with Hydra's compose API, with clear errors and a run directory of our own.

Hydra's compose API gives neither a run directory nor ``${hydra:...}`` interpolations, so no config uses them:
``paths.output_dir`` is fixed here, at compose time, when it is left null.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from adapterctl.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "conf"
ROOT_CONFIGS = ("train", "eval", "export")


def config_groups() -> dict[str, list[str]]:
    """Every config group under ``conf/`` and its options."""
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml") if not p.stem.startswith("_"))  # _base files are not options
        for d in sorted(CONFIG_DIR.iterdir())
        if d.is_dir() and not d.name.startswith((".", "_"))
    }


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _override_key(override: str) -> str:
    key = override.split("=", 1)[0]
    return key.lstrip("+~").split("@", 1)[0]


def _check_groups(overrides: Sequence[str]) -> None:
    groups = config_groups()
    for ov in overrides:
        if "=" not in ov:
            continue
        key, value = _override_key(ov), ov.split("=", 1)[1]
        if key in groups and value not in ("null", "") and not value.startswith(("[", "{")):
            for option in value.split(","):
                if option not in groups[key]:
                    raise ConfigError(
                        f"Unknown option '{option}' for config group '{key}' in override '{ov}'."
                        f"{_suggest(option, groups[key])} Valid options for '{key}': {', '.join(groups[key])}."
                    )


def _explain_bad_key(config_name: str, overrides: Sequence[str], bad: str, exc: Exception) -> ConfigError:
    """Name the override whose key does not exist and list the keys that do at that level."""
    others = [o for o in overrides if _override_key(o) != bad]
    try:
        cfg = _compose_raw(config_name, others)
    except Exception:  # noqa: BLE001 - fall back to Hydra's own words
        return ConfigError(f"Could not apply override for '{bad}': {exc}")
    parts = bad.split(".")
    node: object = cfg
    for i, part in enumerate(parts):
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
            continue
        where = ".".join(parts[:i]) or "the root config"
        if not isinstance(node, DictConfig):
            return ConfigError(f"Key '{bad}' does not exist: '{where}' is a value, not a section.")
        keys = sorted(str(k) for k in node)
        groups = config_groups()
        extra = ""
        if i == 0:
            extra = f" Config groups: {', '.join(groups)}."
        return ConfigError(
            f"Key '{bad}' is not in the config: '{part}' is not a key of {where}.{_suggest(part, keys)} "
            f"Valid keys there: {', '.join(keys)}.{extra} To add a new key, prefix the override with '+' "
            f"(+{bad}=...)."
        )
    return ConfigError(f"Could not apply override for '{bad}': {exc}")


def _compose_raw(config_name: str, overrides: Sequence[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def compose(config_name: str = "train", overrides: Sequence[str] = (), run_dir: bool = False) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides into one resolved config.

    Args:
        config_name: ``train``, ``eval`` or ``export``.
        overrides: Hydra override strings (``model=vit_adapter_s``, ``trainer.max_iters=100``, ``+a.b=1``).
        run_dir: fix ``paths.output_dir`` to ``runs/<experiment_name>/<timestamp>`` when it is null.

    Raises:
        ConfigError: an unknown config, group, option or key; or a value left ``???``.
    """
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if config_name not in ROOT_CONFIGS:
        raise ConfigError(f"Unknown config '{config_name}'. Valid configs: {', '.join(ROOT_CONFIGS)}.")
    overrides = list(overrides)
    _check_groups(overrides)
    try:
        cfg = _compose_raw(config_name, overrides)
    except OverrideParseException as exc:
        raise ConfigError(f"Malformed override: {exc}") from None
    except MissingConfigException as exc:
        raise ConfigError(str(exc).strip()) from None
    except ConfigCompositionException as exc:
        msg = str(exc)
        for ov in overrides:
            key = _override_key(ov)
            if f"'{key}'" in msg or f"'{ov}'" in msg:
                if "No match in the defaults list" in msg:
                    groups = config_groups()
                    raise ConfigError(
                        f"Unknown config group '{key}' in override '{ov}'.{_suggest(key, list(groups))} "
                        f"Config groups: {', '.join(groups)}."
                    ) from None
                raise _explain_bad_key(config_name, overrides, key, exc) from None
        raise ConfigError(msg) from None
    _expand_model_size(cfg)
    if run_dir and cfg.get("paths") is not None and cfg.paths.get("output_dir") is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg.paths.output_dir = str(Path("runs") / str(cfg.get("experiment_name", "default")) / stamp)
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as exc:  # omegaconf raises MissingMandatoryValue / InterpolationResolutionError
        key = getattr(exc, "full_key", None) or ""
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"Config value '{key}' must be set (it is '???' or unresolvable): {reason}.") from None
    return cfg


def _expand_model_size(cfg: DictConfig) -> None:
    """Write a released size's values (``model.size=t``) into every model key the config left null, after the
    overrides: the composed config, ``config.yaml`` and checkpoints then hold each value, while the YAML files hold
    none of them (``adapterctl.models.variants`` is their one home)."""
    from adapterctl.models.variants import SIZE_TABLES

    model = cfg.get("model")
    if not isinstance(model, DictConfig) or "size" not in model or OmegaConf.is_missing(model, "size"):
        return
    expand = SIZE_TABLES.get(str(model.get("family")))
    if expand is None or model.size is None:
        return
    given = {
        k: v
        for k, v in OmegaConf.to_container(model, resolve=True).items()
        if k not in ("family", "size", "layout", "pretrained", "norm_layer")
    }
    try:
        full = expand(str(model.size), str(model.get("layout", "segmentation")), **given)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    for key, value in full.items():
        if key in model and model[key] is None:
            model[key] = value


def to_yaml(cfg: DictConfig | ListConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, directory: str | Path) -> Path:
    """Write the resolved config as ``config.yaml`` (atomically) and return its path."""
    from adapterctl.files import write_text

    return write_text(Path(directory) / "config.yaml", to_yaml(cfg))
