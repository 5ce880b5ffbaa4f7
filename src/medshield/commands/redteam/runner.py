"""The building blocks of a red-teaming run (attacks, judges and defense from their registries)
and :class:`_Runner`, which sends one attack's batch of items through the defense, the model and
the judges, row by row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from medshield.commands.redteam.config import BENIGN_ATTACK, RedteamConfig
from medshield.errors import ConfigError, InputError
from medshield.registry import JAILBREAKS, JUDGES
from medshield.runs import Log, Run

IMAGE_CACHE = 1024  # item images kept in memory (each attack reuses them)


def build_attacks(config: RedteamConfig, model: Any) -> dict[str, Any]:
    """The configured attacks (plus ``direct`` for benign items), by name; white-box ones
    (``white_box``, like ``adv-image-affirm``) are built with the model under test."""
    attacks = {}
    for name in dict.fromkeys([*config.attacks, BENIGN_ATTACK]):
        cls = JAILBREAKS.get(name)
        kwargs = {"seed": config.seed, **config.attack_kwargs.get(name, {})}
        if cls.white_box:
            kwargs.setdefault("model", model)
        try:
            attacks[name] = cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"attack {name!r} does not take these arguments: {exc}") from None
    return attacks


def build_judges(config: RedteamConfig) -> dict[str, Any]:
    """The configured judges, by name."""
    from medshield.eval.judges import create_judge

    judges = {}
    for name in config.judges:
        try:
            judges[name] = create_judge(name, **config.judge_kwargs.get(name, {}))
        except TypeError as exc:
            raise ConfigError(f"judge {name!r} does not take these arguments: {exc}") from None
    return judges


def build_defense(config: RedteamConfig) -> Any:
    """The configured defense (``none``: conversations unchanged)."""
    from medshield.defense import create_defense

    return create_defense(config.defense.name, **config.defense.kwargs)


def check_names(config: RedteamConfig) -> None:
    """Fail early, before any model is loaded, on unknown attack, judge, defense or backend."""
    from medshield.registry import CHAT_MODELS, DEFENSES

    for name in config.attacks:
        JAILBREAKS.get(name)
    for name in config.judges:
        JUDGES.get(name)
    DEFENSES.get(config.defense.name)
    CHAT_MODELS.get(config.model.backend)


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 2000 else text[:2000] + "..."


def _base_row(item: Any, attack: str, defense: str) -> dict[str, Any]:
    return {
        "id": item.id,
        "kind": item.kind,
        "category": item.category,
        "modality": item.modality,
        "image_ref": item.image.key(),
        "source": item.source,
        "template": item.template,
        "subset": item.subset,
        "twin_id": item.twin_id,
        "attack": attack,
        "defense": defense,
        "request": item.text,
        "answer": item.answer,
    }


def _user_text(conversation: Sequence[Any]) -> str:
    users = [m.text for m in conversation if m.role == "user"]
    return users[-1] if users else ""


class _Runner:
    """Builds conversations, generates batch by batch, judges, and writes rows."""

    def __init__(
        self,
        config: RedteamConfig,
        model: Any,
        judges: dict[str, Any],
        log: Log,
        run: Run,
        attacked: dict[tuple[str, str], list[Any]] | None = None,
    ) -> None:
        self.config = config
        self.run = run
        self.model = model
        self.judges = judges
        self.log = log
        self.attacks = build_attacks(config, model)
        self.defense = build_defense(config)
        self.attacked = attacked
        self._images: dict[str, Any] = {}

    def image(self, item: Any) -> Any:
        if item.id not in self._images:
            if len(self._images) >= IMAGE_CACHE:
                self._images.clear()
            self._images[item.id] = item.load_image(self.config.data_dir, self.config.image_size)
        return self._images[item.id]

    def conversation(self, item: Any, attack: str) -> list[Any]:
        """The attacked conversation (white-box ones memoised in ``attacked``), defended."""
        key = (item.id, attack)
        if self.attacked is not None and key in self.attacked:
            conversation = self.attacked[key]
        else:
            conversation = self.attacks[attack].apply(item.text, [self.image(item)])
            if self.attacked is not None and self.attacks[attack].white_box:
                self.attacked[key] = conversation
        return self.defense.apply(conversation)

    def error_row(self, item: Any, attack: str, stage: str, exc: BaseException) -> dict[str, Any]:
        row = _base_row(item, attack, self.config.defense.name)
        row.update(
            prompt=None,
            response=None,
            verdicts={},
            verdict=None,
            correct=None,
            latency_s=None,
            error=_error_text(exc),
            error_stage=stage,
        )
        return row

    def image_files(self, conversation: Sequence[Any]) -> list[str]:
        """The images of the answered user turn, stored in the run directory (see the module
        docstring); their paths relative to it."""
        from medshield.models.chat import image_png

        users = [m for m in conversation if m.role == "user"]
        images = users[-1].images if users else []
        return [self.run.store(image_png(image), "images", ".png") for image in images]

    def generate(self, conversations: list[list[Any]]) -> list[str]:
        gen = self.config.generation
        responses = self.model.generate(
            conversations, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature
        )
        if not isinstance(responses, list) or len(responses) != len(conversations):
            raise InputError(
                f"the model returned {type(responses).__name__} of length "
                f"{len(responses) if hasattr(responses, '__len__') else '?'} for "
                f"{len(conversations)} conversations"
            )
        bad = [i for i, r in enumerate(responses) if not isinstance(r, str)]
        if bad:
            raise InputError(f"the model returned a {type(responses[bad[0]]).__name__}, not text")
        return responses

    def batch(self, work: list[tuple[Any, str]]) -> list[dict[str, Any]]:
        """Rows for one batch of (item, attack): built, answered, judged."""
        rows: list[dict[str, Any]] = []
        ready: list[tuple[Any, str, list[Any]]] = []
        for item, attack in work:
            try:
                ready.append((item, attack, self.conversation(item, attack)))
            except Exception as exc:  # noqa: BLE001 - a bad item must not stop the run
                rows.append(self.error_row(item, attack, "conversation", exc))
        answered: list[tuple[Any, str, list[Any], str, float]] = []
        if ready:
            start = time.perf_counter()
            try:
                responses = self.generate([c for _, _, c in ready])
                each = (time.perf_counter() - start) / len(ready)
                answered = [(*r, text, each) for r, text in zip(ready, responses, strict=True)]
            except Exception as exc:  # noqa: BLE001 - retry one by one to isolate the bad item
                if len(ready) > 1:
                    self.log(f"batch of {len(ready)} failed ({_error_text(exc)}); retrying singly")
                for item, attack, conversation in ready:
                    start = time.perf_counter()
                    try:
                        [text] = self.generate([conversation])
                    except Exception as exc_one:  # noqa: BLE001
                        rows.append(self.error_row(item, attack, "generate", exc_one))
                        self.log(f"error {item.id}/{attack}: {_error_text(exc_one)}")
                        continue
                    answered.append((item, attack, conversation, text, time.perf_counter() - start))
        if answered:
            rows.extend(self.judged(answered))
        return rows

    def judged(
        self, answered: list[tuple[Any, str, list[Any], str, float]]
    ) -> list[dict[str, Any]]:
        requests = [item.text for item, *_ in answered]
        responses = [text for *_, text, _ in answered]
        verdicts = {name: judge.judge(requests, responses) for name, judge in self.judges.items()}
        rows = []
        for i, (item, attack, conversation, text, latency) in enumerate(answered):
            row = _base_row(item, attack, self.config.defense.name)
            row.update(
                prompt=_user_text(conversation),
                image_files=self.image_files(conversation),
                response=text,
                verdicts={name: v[i].to_dict() for name, v in verdicts.items()},
                verdict=verdicts[self.config.primary][i].label,
                correct=item.is_correct(text) if item.kind == "benign" else None,
                latency_s=round(latency, 4),
            )
            rows.append(row)
        return rows
