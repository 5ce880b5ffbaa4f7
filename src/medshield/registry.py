"""Name -> implementation registries (models, chat models, attacks, methods, defenses, judges).

A plugin registers itself with a decorator and a one-line description::

    @MODELS.register("mini-clip", "EfficientNet-Lite0 + MiniLM dual encoder")
    class MiniClip(DualEncoder): ...

Configs then name it, and ``medshield list models`` shows it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from medshield.errors import UnknownNameError

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
