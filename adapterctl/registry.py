"""Registries: the one place a family (backbone, head, task) is named. Adding a family is a new module, its
configs and one ``register`` line; looking up an unknown name lists the valid ones."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from adapterctl.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, key: str) -> None:
        self.kind, self.key = kind, key  # key: the config key that names an entry, for error messages
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), list(self._entries), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{self.key}={name}: unknown {self.kind}.{hint} Valid: {', '.join(self._entries)}.")
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries


@dataclass(frozen=True)
class OfficialHeads:
    """How ``adapterctl convert`` recognises and maps a head family's official (mmdet) checkpoint: the keys whose
    presence marks it (the entry whose marks all match, most marks first, wins), the config overrides read off
    the tensors, and the key mapping ``(tensors, unmatched keys)``."""

    label: str
    marks: tuple[str, ...]
    overrides: Callable  # (state_dict) -> list[str]
    convert: Callable  # (state_dict) -> (dict[str, Tensor], list[str])


@dataclass(frozen=True)
class HeadEntry:
    """A whole-model builder for a head family and the tasks it serves."""

    build: Callable  # (cfg: DictConfig, backbone: nn.Module | None = None) -> nn.Module
    tasks: tuple[str, ...]
    official: OfficialHeads | None = None
