"""Name -> implementation registries (models, chat models, attacks, methods, defenses, judges).

A plugin registers itself with a decorator and a one-line description::

    @MODELS.register("mini-clip", "EfficientNet-Lite0 + MiniLM dual encoder")
    class MiniClip(DualEncoder): ...

Configs then name it, and ``medshield list models`` shows it. Plugins in other packages are
found through the entry-point group :data:`PLUGIN_GROUP` (:func:`load_plugins`).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from medshield.errors import ConfigError, UnknownNameError

#: The entry-point group under which other packages name their plugin modules.
PLUGIN_GROUP = "medshield.plugins"

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    description: str
    obj: T


class Registry(Generic[T]):
    """A named collection of plugins of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, description: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, description, obj)
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name].obj
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none yet"
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: {known}"
            ) from None

    def entries(self) -> list[Entry[T]]:
        return sorted(self._entries.values(), key=lambda e: e.name)

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries


MODELS: Registry = Registry("model")
CHAT_MODELS: Registry = Registry("chat model")
ATTACKS: Registry = Registry("attack")
METHODS: Registry = Registry("method")
DEFENSES: Registry = Registry("defense")
JUDGES: Registry = Registry("judge")
#: Demonstration selection strategies (``medshield.defense.create_strategy(name, **kwargs)``).
STRATEGIES: Registry = Registry("selection strategy")

REGISTRIES: dict[str, Registry] = {
    "models": MODELS,
    "chat-models": CHAT_MODELS,
    "attacks": ATTACKS,
    "methods": METHODS,
    "defenses": DEFENSES,
    "judges": JUDGES,
    "strategies": STRATEGIES,
}


def load_plugins() -> list[str]:
    """Import every module that an installed package declares in the entry-point group
    :data:`PLUGIN_GROUP`, so that its ``@REGISTRY.register`` decorators run; the ``medshield``
    command does this before any subcommand. A package declares, in its ``pyproject.toml``::

        [project.entry-points."medshield.plugins"]
        my_attacks = "my_package.attacks"

    Returns the names of the entry points loaded. Raises ConfigError, naming the entry point,
    when one fails to import or registers a name that is already taken."""
    loaded = []
    for entry_point in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            entry_point.load()
        except Exception as exc:  # noqa: BLE001 - any failure in a third-party module
            raise ConfigError(
                f"the medshield plugin {entry_point.name!r} ({entry_point.value}) failed to "
                f"import: {type(exc).__name__}: {exc}"
            ) from exc
        loaded.append(entry_point.name)
    return loaded
