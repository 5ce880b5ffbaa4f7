"""Name -> implementation registries (models, chat models, attacks, methods, defenses, judges).

A plugin registers itself with a decorator, its name and a one-line description::

    @MODELS.register("mini-clip", "EfficientNet-Lite0 + MiniLM dual encoder")
    class MiniClip(DualEncoder): ...

The decorator sets the class's name attribute (``name``; ``backend`` for models), so a class
never writes its name itself. Configs then name it, and ``medshield list models`` shows it.

Each registry knows the package that holds its built-in plugins and imports every module of it
on the first lookup, so a built-in plugin is one file and nothing else. Attacks have one registry
per call contract (image, multimodal and text attacks, jailbreaks), so whoever gets an attack
from a registry knows how to call it. Plugins in other packages are found through the
entry-point group :data:`PLUGIN_GROUP` (:func:`load_plugins`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

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
    """A named collection of plugins of one kind.

    Args:
        kind: what one plugin is, for messages ("jailbreak": "unknown jailbreak 'x'; registered
            jailbreaks: ...").
        package: the package of the built-in plugins; it and every module in it (not in its
            subpackages) are imported on the first lookup (a plain module is only imported).
        attribute: the class attribute that :meth:`register` sets to the registered name.
    """

    def __init__(self, kind: str, package: str, attribute: str = "name") -> None:
        self.kind = kind
        self.package = package
        self.attribute = attribute
        self._entries: dict[str, Entry[T]] = {}
        self._discovered = False

    def register(self, name: str, description: str) -> Callable[[T], T]:
        """A class decorator: registers the class as ``name`` and sets its name attribute.

        Raises ValueError when ``name`` is taken, or when the class itself already sets the
        attribute to another name."""

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            own = vars(obj).get(self.attribute)
            if own not in (None, "", name):
                owner = getattr(obj, "__name__", repr(obj))
                raise ValueError(
                    f"{self.kind} {name!r}: {owner}.{self.attribute} is {own!r}; remove that "
                    "line, register() sets it"
                )
            setattr(obj, self.attribute, name)
            self._entries[name] = Entry(name, description, obj)
            return obj

        return decorator

    def discover(self) -> None:
        """Import every module of the built-in package once (each registers its plugins)."""
        if self._discovered:
            return
        self._discovered = True  # a lookup while the modules import sees those registered so far
        try:
            package = importlib.import_module(self.package)
            for module in pkgutil.iter_modules(
                getattr(package, "__path__", ()), f"{self.package}."
            ):
                importlib.import_module(module.name)
        except BaseException:
            self._discovered = False
            raise

    def get(self, name: str) -> T:
        self.discover()
        try:
            return self._entries[name].obj
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none yet"
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: {known}"
            ) from None

    def entries(self) -> list[Entry[T]]:
        self.discover()
        return sorted(self._entries.values(), key=lambda e: e.name)

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def defaults(self) -> list[str]:
        """The names of the plugins whose class sets ``default`` (a positive number, ``True``
        counting as 1), ordered by that number, then by name: what runs when a config lists
        none (e.g. the jailbreaks of ``medshield redteam``)."""
        chosen = [e for e in self.entries() if _default_rank(e.obj) > 0]
        return [e.name for e in sorted(chosen, key=lambda e: _default_rank(e.obj))]

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries


def _default_rank(obj: Any) -> int:
    return int(getattr(obj, "default", 0) or 0)


MODELS: Registry = Registry("model", "medshield.models", attribute="backend")
CHAT_MODELS: Registry = Registry("chat model", "medshield.models", attribute="backend")
#: ``Attack`` subclasses: ``cls(model, eps, ...)(images, labels)`` -> adversarial images.
IMAGE_ATTACKS: Registry = Registry("image attack", "medshield.attacks")
#: ``MultimodalAttack`` subclasses on image-caption pairs (``noise.attack``, ``retrieval_attack``).
MULTIMODAL_ATTACKS: Registry = Registry("multimodal attack", "medshield.attacks")
#: Text attacks on captions and questions (``WordSubstitutionAttack``).
TEXT_ATTACKS: Registry = Registry("text attack", "medshield.attacks.text")
#: ``JailbreakAttack`` subclasses: request and images -> conversation (``redteam.attacks``).
JAILBREAKS: Registry = Registry("jailbreak", "medshield.attacks.jailbreak")
METHODS: Registry = Registry("method", "medshield.train.finetune")
DEFENSES: Registry = Registry("defense", "medshield.defense")
JUDGES: Registry = Registry("judge", "medshield.eval.judges")
#: Demonstration selection strategies (``medshield.defense.create_strategy(name, **kwargs)``).
STRATEGIES: Registry = Registry("selection strategy", "medshield.defense")

ALL_REGISTRIES: tuple[Registry, ...] = (
    MODELS,
    CHAT_MODELS,
    IMAGE_ATTACKS,
    MULTIMODAL_ATTACKS,
    TEXT_ATTACKS,
    JAILBREAKS,
    METHODS,
    DEFENSES,
    JUDGES,
    STRATEGIES,
)

#: What ``medshield list KIND`` shows; ``attacks`` is every attack registry together.
REGISTRIES: dict[str, tuple[Registry, ...]] = {
    "models": (MODELS,),
    "chat-models": (CHAT_MODELS,),
    "attacks": (IMAGE_ATTACKS, MULTIMODAL_ATTACKS, TEXT_ATTACKS, JAILBREAKS),
    "image-attacks": (IMAGE_ATTACKS,),
    "multimodal-attacks": (MULTIMODAL_ATTACKS,),
    "text-attacks": (TEXT_ATTACKS,),
    "jailbreaks": (JAILBREAKS,),
    "methods": (METHODS,),
    "defenses": (DEFENSES,),
    "judges": (JUDGES,),
    "strategies": (STRATEGIES,),
}


def load_plugins() -> list[str]:
    """Import every module that an installed package declares in the entry-point group
    :data:`PLUGIN_GROUP`, so that its ``@REGISTRY.register`` decorators run; the ``medshield``
    command does this before any subcommand. A package declares, in its ``pyproject.toml``::

        [project.entry-points."medshield.plugins"]
        my_attacks = "my_package.attacks"

    Returns the names of the entry points loaded. Raises ConfigError, naming the entry point,
    when one fails to import or registers a name that is already taken."""
    entry_points = list(importlib.metadata.entry_points(group=PLUGIN_GROUP))
    if entry_points:  # the built-ins first, so that a plugin taking one of their names is refused
        for registry in ALL_REGISTRIES:
            registry.discover()
    loaded = []
    for entry_point in entry_points:
        try:
            entry_point.load()
        except Exception as exc:  # noqa: BLE001 - any failure in a third-party module
            raise ConfigError(
                f"the medshield plugin {entry_point.name!r} ({entry_point.value}) failed to "
                f"import: {type(exc).__name__}: {exc}"
            ) from exc
        loaded.append(entry_point.name)
    return loaded
