"""The registries: the name written once, the ``default`` flag, one registry per attack contract,
built-in plugins found without an import line."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medshield.attacks.base import Attack
from medshield.attacks.jailbreak.base import JailbreakAttack
from medshield.attacks.multimodal import MultimodalAttack
from medshield.errors import UnknownNameError
from medshield.registry import (
    ALL_REGISTRIES,
    IMAGE_ATTACKS,
    JAILBREAKS,
    MULTIMODAL_ATTACKS,
    REGISTRIES,
    TEXT_ATTACKS,
    Registry,
)

# Every name the single ATTACKS registry held before issue 24: configs keep naming these.
ATTACK_NAMES = {
    "apgd-ce",
    "apgd-dlr",
    "fgsm",
    "pgd",
    "co-attack",
    "sga",
    "word-substitution",
    "adv-image-affirm",
    "direct",
    "figstep",
    "jb-authority",
    "jb-hypothetical",
    "jb-prefix-injection",
    "jb-refusal-suppression",
    "jb-roleplay",
}


def a_package(root: Path, files: dict[str, str]) -> None:
    """A package ``plugpkg`` under ``root``: ``core.py`` holds a registry of ``thing``s whose
    built-ins are the package's modules; ``files`` are the other modules."""
    package = root / "plugpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "core.py").write_text(
        "from medshield.registry import Registry\nTHINGS = Registry('thing', 'plugpkg')\n"
    )
    for name, source in files.items():
        (package / f"{name}.py").write_text(textwrap.dedent(source))


def test_built_in_plugins_are_found_without_an_import_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a_package(
        tmp_path,
        {
            "one": """
                from plugpkg.core import THINGS

                @THINGS.register("one", "the first")
                class One:
                    default = 2
            """,
            "two": """
                from plugpkg.core import THINGS

                @THINGS.register("two", "the second")
                class Two:
                    default = True

                @THINGS.register("three", "not a default")
                class Three:
                    pass
            """,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from plugpkg.core import THINGS  # imports neither one.py nor two.py

    try:
        assert THINGS.names() == ["one", "three", "two"]
        assert THINGS.get("one").name == "one" and THINGS.get("three").name == "three"
        assert THINGS.defaults() == ["two", "one"]  # by the `default` number (True is 1)
        assert "two" in THINGS and "four" not in THINGS
        with pytest.raises(UnknownNameError, match="unknown thing 'four'; registered things: one"):
            THINGS.get("four")
    finally:
        for module in [m for m in sys.modules if m == "plugpkg" or m.startswith("plugpkg.")]:
            del sys.modules[module]


def test_register_writes_the_name_and_refuses_another() -> None:
    things: Registry = Registry("thing", "medshield.errors", attribute="backend")

    @things.register("a", "an a")
    class A:
        pass

    assert A.backend == "a" and things.get("a") is A  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="thing 'a' is registered twice"):
        things.register("a", "again")(type("B", (), {}))
    with pytest.raises(ValueError, match=r"C\.backend is 'c'; remove that line"):
        things.register("see", "a class naming itself otherwise")(type("C", (), {"backend": "c"}))

    @things.register("d", "a subclass of a registered class gets its own name")
    class D(A):
        pass

    assert D.backend == "d" and A.backend == "a"  # type: ignore[attr-defined]


@pytest.mark.parametrize("registry", ALL_REGISTRIES, ids=lambda r: r.kind)
def test_no_built_in_class_writes_its_registered_name(registry: Registry) -> None:
    for entry in registry.entries():
        cls = entry.obj
        if not cls.__module__.startswith("medshield."):
            continue  # a test double
        assert getattr(cls, registry.attribute) == entry.name
        (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
        assigned = [
            target.id
            for statement in node.body
            if isinstance(statement, (ast.Assign, ast.AnnAssign))
            for target in (
                statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            )
            if isinstance(target, ast.Name)
        ]
        assert registry.attribute not in assigned, f"{cls.__name__} sets {registry.attribute}"


def test_one_registry_per_attack_contract_with_the_old_names() -> None:
    contracts = {
        IMAGE_ATTACKS: Attack,
        MULTIMODAL_ATTACKS: MultimodalAttack,
        JAILBREAKS: JailbreakAttack,
    }
    for registry, base in contracts.items():
        assert registry.names() and all(issubclass(e.obj, base) for e in registry.entries())
    assert TEXT_ATTACKS.names() == ["word-substitution"]
    every = [n for r in REGISTRIES["attacks"] for n in r.names()]
    assert len(every) == len(set(every)) and set(every) == ATTACK_NAMES
    with pytest.raises(UnknownNameError, match="registered multimodal attacks: co-attack, sga$"):
        MULTIMODAL_ATTACKS.get("pgd")
    with pytest.raises(UnknownNameError, match=r"unknown image attack 'sga'.*: apgd-ce, "):
        IMAGE_ATTACKS.get("sga")


def test_a_fresh_interpreter_finds_every_built_in_from_the_registry_alone() -> None:
    # Nothing but medshield.registry is imported: each registry imports its own package.
    code = (
        "import json; from medshield.registry import REGISTRIES; "
        "print(json.dumps({k: [n for r in rs for n in r.names()] for k, rs in REGISTRIES.items()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    found = {kind: set(names) for kind, names in json.loads(out.stdout).items()}
    here = {
        kind: {e.name for r in rs for e in r.entries() if e.obj.__module__.startswith("medshield.")}
        for kind, rs in REGISTRIES.items()
    }
    assert found == here
    assert found["attacks"] == ATTACK_NAMES
    assert found["methods"] >= {"linear-probe", "full", "lora", "adapter", "tecoa", "fare", "ran"}
    assert found["methods"] >= {"adv-lora", "adv-adapter", "adv-linear-probe", "fare-probe"}
    assert found["defenses"] >= {"none", "self-reminder", "demonstrations"}
    assert found["judges"] >= {"keyword", "embedding", "llm"}
    assert found["models"] >= {"mini-clip", "open_clip", "hf-clip"}


def test_the_redteam_and_study_defaults_are_the_old_lists() -> None:
    from medshield.commands.redteam import RedteamConfig
    from medshield.commands.studies.defense.config import DefenseStudyConfig

    # DEFAULT_ATTACKS and DEFAULT_JUDGES of safety/redteam.py before the `default` flag: a
    # config that lists neither runs the same attacks and judges, in the same order.
    old_attacks = [
        "direct",
        "jb-roleplay",
        "jb-refusal-suppression",
        "jb-prefix-injection",
        "jb-hypothetical",
        "jb-authority",
        "figstep",
    ]
    config = RedteamConfig()
    assert config.attacks == old_attacks and config.judges == ["keyword", "embedding"]
    assert config.primary == "keyword"
    assert DefenseStudyConfig().redteam.attacks == [*old_attacks, "adv-image-affirm"]
