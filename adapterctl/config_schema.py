"""Types and ranges of the config values a run reads, checked before any work starts.

Hydra accepts ``trainer.max_iters=abc`` or ``optim.lr=-1``; without this, the mistake surfaces after the model
is built (or hours later) as a traceback. Each rule names a key; keys absent from a config are not checked
(schedules and datasets have different fields).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from adapterctl.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    kind: str  # int | float | bool | str | choice
    ok: Callable[[Any], bool] = lambda v: True
    expected: str = ""
    nullable: bool = False
    choices: tuple[str, ...] = ()


def _int(ok=lambda v: True, expected="an integer", nullable=False) -> Rule:
    return Rule("int", ok, expected, nullable)


def _float(ok=lambda v: True, expected="a number", nullable=False) -> Rule:
    return Rule("float", ok, expected, nullable)


def _choice(*choices: str) -> Rule:
    return Rule("choice", expected=f"one of {', '.join(choices)}", choices=choices)


POSITIVE_INT = _int(lambda v: v > 0, "a positive integer")
NON_NEGATIVE_INT = _int(lambda v: v >= 0, "an integer >= 0")

TRAIN_RULES: dict[str, Rule] = {
    "seed": NON_NEGATIVE_INT,
    "trainer.max_iters": POSITIVE_INT,
    "trainer.batch_size": POSITIVE_INT,
    "trainer.num_workers": NON_NEGATIVE_INT,
    "trainer.log_interval": POSITIVE_INT,
    "trainer.eval_interval": POSITIVE_INT,
    "trainer.checkpoint_interval": POSITIVE_INT,
    "trainer.keep_checkpoints": NON_NEGATIVE_INT,
    "trainer.final_eval": Rule("bool", expected="true or false"),
    "trainer.device": _choice("auto", "cpu", "cuda"),
    "trainer.amp": _choice("auto", "bf16", "fp16", "none"),
    "optim.lr": _float(lambda v: v > 0, "a positive number"),
    "optim.weight_decay": _float(lambda v: v >= 0, "a number >= 0"),
    "optim.layer_decay_rate": _float(lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "optim.grad_clip": _float(lambda v: v > 0, "a positive number or null", nullable=True),
    "schedule.warmup_iters": NON_NEGATIVE_INT,
    "schedule.warmup_ratio": _float(lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "schedule.power": _float(lambda v: v >= 0, "a number >= 0"),
    "schedule.gamma": _float(lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "load_from": Rule("str", expected="a checkpoint path or null", nullable=True),
    "data.num_classes": POSITIVE_INT,
    "data.ignore_index": NON_NEGATIVE_INT,
    "data.on_bad_sample": _choice("error", "skip"),
}

EVAL_RULES: dict[str, Rule] = {
    "trainer.num_workers": NON_NEGATIVE_INT,
    "trainer.device": _choice("auto", "cpu", "cuda"),
    "trainer.amp": Rule(
        "choice",
        expected="auto, bf16, fp16, none or null (the checkpoint's)",
        nullable=True,
        choices=("auto", "bf16", "fp16", "none"),
    ),
    "mode": Rule(
        "choice",
        expected="whole, slide, aug or null (the checkpoint's)",
        nullable=True,
        choices=("whole", "slide", "aug"),
    ),
    "save_predictions": Rule("bool", expected="true or false"),
}


_ABSENT = object()


def _fits(rule: Rule, value: Any) -> bool:
    if value is None:
        return rule.nullable
    if rule.kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and rule.ok(value)
    if rule.kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and rule.ok(float(value))
    if rule.kind == "bool":
        return isinstance(value, bool)
    if rule.kind == "choice":
        return isinstance(value, str) and value in rule.choices
    return isinstance(value, str)


def check_config(cfg: DictConfig, rules: dict[str, Rule] = TRAIN_RULES, keys: Sequence[str] | None = None) -> None:
    """Raise :class:`ConfigError` for the first value that breaks its rule, naming key, value and expectation."""
    for key in keys or rules:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not _fits(rules[key], value):
            raise ConfigError(f"{key}={value!r}: expected {rules[key].expected}")
