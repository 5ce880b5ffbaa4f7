"""The README's first commands are what CI runs: .ci/run installs with exactly the README's
install line, and installs nothing that the README does not show."""

from __future__ import annotations

import shlex
from pathlib import Path

from markdown_it import MarkdownIt

from medshield.models.smollm import INSTALL_HINT

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI = (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def bash_blocks(markdown: str) -> list[str]:
    """The bodies of the ```bash code blocks, in order."""
    tokens = MarkdownIt("commonmark").parse(markdown)
    return [t.content for t in tokens if t.type == "fence" and t.info.strip() == "bash"]


def commands(script: str) -> list[str]:
    """The simple commands of a shell script, one string of its unquoted words each: comments
    dropped, continued lines joined, commands split at ``&&``, ``;`` and ``||``, and a leading
    ``sudo`` or ``$sudo`` removed."""
    out = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        words: list[str] = []
        for token in [*lexer, "&&"]:
            if token not in ("&&", ";", "||"):
                words.append(token)
                continue
            if words and words[0] in ("sudo", "$sudo"):
                words = words[1:]
            if words:
                out.append(" ".join(words))
            words = []
    return out


def installs(script: str) -> list[str]:
    """The commands that install something (pip or apt-get)."""
    return [c for c in commands(script) if c.split()[0] in ("pip", "apt-get") and " install " in c]


def test_commands_are_read_as_the_shell_does() -> None:
    script = "a 'b[c]' && $sudo apt-get install -y x # comment\nif ! x; then\n  sudo y \\\n z; fi"
    assert commands(script) == ["a b[c]", "apt-get install -y x", "if ! x", "then", "y z", "fi"]


def test_the_first_block_installs_runs_the_demo_and_tests() -> None:
    first = bash_blocks(README)[0]
    lines = commands(first)
    assert lines[-2:] == ["medshield demo", "python -m pytest -q"]
    assert installs(first) == ["pip install -e .[dev]", INSTALL_HINT]  # the error's fix too
    assert "python -m pytest -q" in commands(CI)


def test_ci_installs_with_exactly_the_readme_install_line() -> None:
    readme = [c for c in installs(bash_blocks(README)[0]) if c.startswith("pip ")]
    ci = [c for c in installs(CI) if c.startswith("pip ")]
    assert ci == readme
    assert not any("pip" in c.split()[:3] for c in commands(CI) if c not in ci)  # no other pip


def test_ci_installs_nothing_the_readme_does_not_show() -> None:
    shown = {c for block in bash_blocks(README) for c in installs(block)}
    assert set(installs(CI)) <= shown, set(installs(CI)) - shown
    assert "apt-get install -y --no-install-recommends chromium" in shown
