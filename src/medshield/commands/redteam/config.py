"""The red-teaming config (:class:`RedteamConfig`) and its parts, read from YAML by
:func:`load_redteam_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from medshield.config import FolderName, StrictModel, load_yaml_model
from medshield.registry import JAILBREAKS, JUDGES

BENIGN_ATTACK = "direct"


class ChatModelConfig(StrictModel):
    """A registered chat backend (``medshield list chat-models``) and its arguments, e.g.
    ``{backend: mini-llava, kwargs: {checkpoint: runs/vlm/model}}`` or
    ``{backend: openai, kwargs: {base_url: http://localhost:8000/v1, model: llava}}``."""

    backend: str = "mini-llava"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class DefenseConfig(StrictModel):
    """A registered defense (``medshield list defenses``) and its arguments; ``none`` sends
    conversations unchanged."""

    name: str = "none"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class GenerationConfig(StrictModel):
    """Decoding: ``temperature`` 0 is greedy; ``batch_size`` conversations per ``generate``."""

    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)


class RedteamConfig(StrictModel):
    """What ``medshield redteam`` runs.

    Attributes:
        name, output_dir: the run directory is ``output_dir/name``.
        seed: item sampling, attack template choice and bootstrap seed.
        model: the chat backend under test.
        source: a safety source of :data:`medshield.data.safety.SOURCES` (default: the medshield
            query benchmark); ``source_options`` go to its loader. ``file`` reads the user's own
            requests from ``query_file``.
        query_file: a .jsonl or .csv file of requests (``request``, ``label`` harmful|benign,
            optional ``id``, ``modality``, ``image``, ``answer``, ``category``; see
            :mod:`medshield.data.safety.queryfile`), read with ``source: file`` only.
        data_dir: data root (default: ``MEDSHIELD_DATA_DIR`` or the package default).
        modalities: keep only these modalities (None: all the source offers). For external,
            text-only sets this is the modality of the paired images; for a query file, rows
            of other modalities are left out and rows without one are kept (with neither a
            modality nor an image, a row is paired with an image of the first).
        limit: at most this many harmful and this many benign items (None: all), sampled with
            ``seed`` across modalities and categories; benign twins of the chosen harmful items
            are preferred, so over-defense is measured on the same images.
        attacks: registered jailbreaks (``medshield list jailbreaks``) applied to every harmful
            item; by default ``JAILBREAKS.defaults()`` (``direct``, the five text jailbreaks and
            ``figstep``; ``adv-image-affirm`` is opt-in: it needs a white-box model and costs
            ``steps`` forward/backward passes per item). ``attack_kwargs`` gives per-attack
            arguments (``seed`` defaults to ``seed``; white-box attacks get the model).
        judges: registered judges that label every answer (by default ``JUDGES.defaults()``:
            ``keyword``, ``embedding``); ``primary_judge`` (default: the first) gives the row's
            ``verdict`` and the headline metrics; ``judge_kwargs`` gives per-judge arguments
            (e.g. ``{llm: {model: openai, base_url: ...}}``).
        judge_agreement: measure each judge against the held-out labelled answers.
        defense: the defense applied to every conversation (``none`` by default).
        generation: decoding settings.
        image_size: resize item images to this side (None: native size).
        bootstrap_resamples: bootstrap resamples of the metric intervals.
    """

    name: FolderName = "redteam"
    output_dir: str = "runs"
    seed: int = 0
    model: ChatModelConfig = Field(default_factory=ChatModelConfig)
    source: str = "medshield"
    source_options: dict[str, Any] = Field(default_factory=dict)
    query_file: str | None = None
    data_dir: str | None = None
    modalities: list[str] | None = None
    limit: int | None = Field(None, ge=1)
    attacks: list[str] = Field(default_factory=JAILBREAKS.defaults, min_length=1)
    attack_kwargs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    judges: list[str] = Field(default_factory=JUDGES.defaults, min_length=1)
    primary_judge: str | None = None
    judge_kwargs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    judge_agreement: bool = True
    defense: DefenseConfig = Field(default_factory=DefenseConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    image_size: int | None = Field(None, ge=8)
    bootstrap_resamples: int = Field(1000, ge=10)

    @model_validator(mode="after")
    def _check(self) -> RedteamConfig:
        if self.source == "file" and self.query_file is None:
            raise ValueError("source: file needs query_file, a .jsonl or .csv file of requests")
        if self.source != "file" and self.query_file is not None:
            raise ValueError(
                f"query_file is only read with source: file (source is {self.source!r}); add "
                "source=file or remove query_file"
            )
        for what, names in (("attacks", self.attacks), ("judges", self.judges)):
            if len(set(names)) != len(names):
                raise ValueError(f"{what} lists a name twice: {names}")
        if self.primary_judge is not None and self.primary_judge not in self.judges:
            raise ValueError(
                f"primary_judge {self.primary_judge!r} is not one of judges {self.judges}"
            )
        unused = sorted(set(self.attack_kwargs) - set(self.attacks) - {BENIGN_ATTACK})
        if unused:
            raise ValueError(f"attack_kwargs for attacks that are not run: {unused}")
        return self

    @property
    def primary(self) -> str:
        """The judge whose verdict the headline metrics use."""
        return self.primary_judge or self.judges[0]


def load_redteam_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> RedteamConfig:
    """Read a YAML red-teaming config (defaults when ``path`` is None) with ``key=value``
    overrides (see :func:`medshield.config.apply_overrides`)."""
    return load_yaml_model(RedteamConfig, path, overrides)
