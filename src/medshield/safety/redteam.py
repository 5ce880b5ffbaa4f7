"""``medshield redteam``: run the clinical safety benchmark against a generative (chat) VLM.

For every selected harmful item and every configured attack, the attack turns the request and
its medical image into a conversation, the optional defense rewrites it, the model answers and
every configured judge labels the answer (harmful compliance / refusal / non-answer). Benign
twins are sent ``direct`` only (under the same defense), to measure over-defense (benign
requests refused) and benign accuracy (answers checked against the known answer).

The run directory (see :class:`medshield.runs.Run`) holds::

    config.yaml     the resolved RedteamConfig
    samples.jsonl   one row per (item id, attack), appended batch by batch: the source of truth
    images/         the images the model received, one PNG per distinct image, named by the
                    start of its SHA-256 (``Run.store``)
    results.json    metrics per attack / modality / category with 95% bootstrap intervals,
                    each judge's agreement with the held-out labelled answers, latency, and
                    the item source (for ``source: file``, ``query_file``: the file's resolved
                    path, SHA-256 and number of rows)

A row::

    {"id": "h-...", "kind": "harmful", "category": "insurance_fraud", "modality": "chest_xray",
     "image_ref": "medmnist:chest_xray:test:17:", "attack": "jb-roleplay", "defense": "none",
     "request": "<benchmark text>",
     "prompt": "<attacked user turn text>", "image_files": ["images/3f9c0d1e2a4b5c6d.png"],
     "response": "...",
     "verdicts": {"keyword": {"label": "refusal", ...}, ...}, "verdict": "refusal",
     "correct": null, "latency_s": 0.41, ...}

``image_ref`` is the item's source image before any attack (:meth:`ImageRef.key`: dataset,
modality, split, index, file name); ``image_files`` are the images of the user turn the model
answered, after the attack and the defense (FigStep's typography, an adversarial image), as
8-bit PNGs in the run directory, in the order sent (rows that failed have none).
``latency_s`` is the wall time of the row's ``generate`` batch divided by the batch size (work
is grouped by attack, so a batch holds one attack); judging is not included.

Rows of items that failed (an image that is not an image, a conversation the attack or defense
rejects, an endpoint that timed out or answered malformed JSON, a prompt longer than the model's
context) carry ``error`` and ``error_stage`` instead of a response; the run goes on and the
metrics count them in ``n_errors``. Re-running the same config resumes: finished (id, attack)
keys are skipped (error rows too, unless ``run_redteam(..., retry_errors=True)``).

Example::

    cfg = load_redteam_config("configs/redteam_quick.yaml", ["limit=10"])
    run = Run(Path(cfg.output_dir) / cfg.name, cfg)
    results = run_redteam(cfg, run, log=print)
"""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from tqdm.auto import tqdm

from medshield.config import FolderName, StrictModel, load_yaml_model
from medshield.errors import ConfigError, InputError
from medshield.eval.metrics import format_metric
from medshield.registry import JAILBREAKS, JUDGES
from medshield.runs import Log, Reporter, Run, check_measured

BENIGN_ATTACK = "direct"
SUMMARY_GROUPS = ("modality", "category", "attack")
IMAGE_CACHE = 1024  # item images kept in memory (each attack reuses them)


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


# --- items ---------------------------------------------------------------------------------------


def load_items(config: RedteamConfig) -> list[Any]:
    """Every item of ``config.source`` in the configured modalities (duplicates dropped)."""
    from medshield.data.safety import load_safety_items

    modalities: Sequence[str | None] = config.modalities or [None]
    items: dict[str, Any] = {}
    for modality in modalities:
        for item in load_safety_items(
            config.source,
            modality=modality,
            data_dir=config.data_dir,
            path=config.query_file,
            **config.source_options,
        ):
            items.setdefault(item.id, item)
    if not items:
        source = config.query_file or repr(config.source)
        raise ConfigError(f"source {source} gave no items for modalities {modalities}")
    return list(items.values())


def select_items(items: Sequence[Any], limit: int | None, seed: int) -> list[Any]:
    """At most ``limit`` harmful, ``limit`` plain benign and ``limit`` near-miss benign items, in
    their original order.

    Harmful items are a seeded random sample (so a small limit still spans modalities and
    categories); benign items are first the twins of the chosen harmful ones, then a seeded
    sample of the rest; near-miss items (``subset`` ``"near_miss"``) likewise, apart from the
    plain benign ones, first those whose harmful twin was chosen.
    """
    if limit is None:
        return list(items)
    from medshield.data.safety import NEAR_MISS

    rng = random.Random(f"redteam-select\x1f{seed}")
    harmful = [i for i in items if i.kind == "harmful"]
    chosen_harmful = rng.sample(harmful, min(limit, len(harmful)))
    keep = {i.id for i in chosen_harmful}
    twins = {i.twin_id for i in chosen_harmful if i.twin_id}
    near_miss = [i for i in items if i.kind == "benign" and i.subset == NEAR_MISS]
    plain = [i for i in items if i.kind == "benign" and i.subset != NEAR_MISS]
    for benign in (plain, near_miss):
        first = [i for i in benign if i.id in twins or i.twin_id in keep]
        rest = [i for i in benign if i.id not in {f.id for f in first}]
        keep |= {i.id for i in (first + rng.sample(rest, len(rest)))[:limit]}
    return [i for i in items if i.id in keep]


def plan(items: Sequence[Any], attacks: Sequence[str]) -> list[tuple[Any, str]]:
    """Every (item, attack) to run: harmful items under each attack, benign ones ``direct``.

    Grouped by attack (``direct`` first, with the benign items), so a batch holds one attack
    and its per-row latency is that attack's.
    """
    order = list(dict.fromkeys([BENIGN_ATTACK, *attacks]))
    work = []
    for attack in order:
        for item in items:
            if (item.kind == "harmful" and attack in attacks) or (
                item.kind != "harmful" and attack == BENIGN_ATTACK
            ):
                work.append((item, attack))
    return work


# --- building blocks -----------------------------------------------------------------------------


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


# --- the workflow --------------------------------------------------------------------------------


def _latency(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    values = [r["latency_s"] for r in rows if not r.get("error") and r.get("latency_s") is not None]
    if not values:
        return {"n": 0, "mean_s": None, "median_s": None, "total_s": 0.0}
    return {
        "n": len(values),
        "mean_s": round(statistics.fmean(values), 4),
        "median_s": round(statistics.median(values), 4),
        "total_s": round(sum(values), 2),
    }


def _n_items(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Items per kind; near-miss benign items apart from the plain benign ones (when present)."""
    from medshield.data.safety import NEAR_MISS

    near = {r["id"] for r in rows if r.get("subset") == NEAR_MISS}
    counts = {
        kind: len({r["id"] for r in rows if r["kind"] == kind and r["id"] not in near})
        for kind in ("harmful", "benign")
    }
    return {**counts, NEAR_MISS: len(near)} if near else counts


def summarize_run(
    config: RedteamConfig, rows: Sequence[dict[str, Any]], judges: dict[str, Any] | None
) -> dict[str, Any]:
    """results.json content from the sample rows (and judge agreement when judges are given)."""
    from medshield.data.safety import query_file_record
    from medshield.eval.safety_metrics import summarize_safety

    metrics = summarize_safety(
        rows,
        judge=config.primary,
        groups=SUMMARY_GROUPS,
        n_resamples=config.bootstrap_resamples,
        seed=config.seed,
    )
    by_judge = {
        name: summarize_safety(
            rows,
            judge=name,
            groups=("attack",),
            n_resamples=config.bootstrap_resamples,
            seed=config.seed,
        )
        for name in config.judges
    }
    agreement = []
    if judges and config.judge_agreement:
        from medshield.eval.judges import judge_agreement

        agreement = [judge_agreement(judge).to_dict() for judge in judges.values()]
    errors = [r for r in rows if r.get("error")]
    return {
        "redteam": {
            "model": config.model.backend,
            "source": config.source,
            **({"query_file": query_file_record(config.query_file)} if config.query_file else {}),
            "defense": config.defense.name,
            "attacks": list(config.attacks),
            "primary_judge": config.primary,
            "n_items": _n_items(rows),
            "n_rows": len(rows),
            "n_errors": len(errors),
            "errors_by_stage": dict(Counter(r.get("error_stage", "?") for r in errors)),
            "metrics": metrics,
            "metrics_by_judge": by_judge,
            "judge_agreement": agreement,
            "latency": _latency(rows),
            "latency_by_attack": {
                a: _latency([r for r in rows if r["attack"] == a])
                for a in sorted({r["attack"] for r in rows})
            },
        }
    }


def run_redteam(
    config: RedteamConfig,
    run: Run,
    log: Log = print,
    retry_errors: bool = False,
    *,
    model: Any | None = None,
    judges: dict[str, Any] | None = None,
    attacked: dict[tuple[str, str], list[Any]] | None = None,
    report: Reporter | None = None,
) -> dict[str, Any]:
    """Run (or resume) the red-teaming benchmark into ``run`` and return the results dict
    (also written to ``results.json``, then the report with ``report``, by
    :meth:`~medshield.runs.Run.finish`).

    Finished (id, attack) rows already in ``samples.jsonl`` are kept and not recomputed; with
    ``retry_errors`` the rows that ended in an error are dropped and run again (e.g. after an
    endpoint outage).

    Several runs of the same items and attacks under different defenses (a study) can share
    work: ``model`` is an already-loaded chat backend (used as it is and left open; by default
    the configured backend is loaded here and closed at the end), ``judges`` already-built
    judges by name, and ``attacked`` a dict, shared between the runs, in which the attacked
    conversations of white-box attacks (``white_box``) are kept by (item id, attack), so
    each is crafted once against the undefended model and every run defends the same one.

    Raises:
        ConfigError: an empty item selection or bad attack/judge arguments.
        UnknownNameError: an unknown source, modality, attack, judge, defense or backend.
        DataError: missing benchmark data.
        NothingMeasured: every row ended in an error (e.g. the endpoint is down); the rows
            stay in ``samples.jsonl``, so ``retry_errors`` reruns them.
    """
    check_names(config)
    items = select_items(load_items(config), config.limit, config.seed)
    work = plan(items, config.attacks)
    keys = {(item.id, attack) for item, attack in work}

    on_disk = run.load_samples()
    if retry_errors and any(r.get("error") for r in on_disk):
        on_disk = [r for r in on_disk if not r.get("error")]
        run.rewrite_samples(on_disk)
    done: dict[tuple[str, str], dict[str, Any]] = {}
    for r in on_disk:  # rows outside this selection (none under the same config) are ignored
        if (r.get("id"), r.get("attack")) in keys:
            done.setdefault((r["id"], r["attack"]), r)
    rows = list(done.values())
    pending = [(item, attack) for item, attack in work if (item.id, attack) not in done]
    n_harmful = sum(1 for i in items if i.kind == "harmful")
    log(
        f"redteam {config.model.backend} on {config.query_file or config.source}: "
        f"{n_harmful} harmful x {len(config.attacks)} attacks + {len(items) - n_harmful} benign "
        f"= {len(work)} rows; "
        f"{len(done)} done, {len(pending)} to run (defense: {config.defense.name})"
    )

    judges = judges if judges is not None else build_judges(config)
    if pending:
        owned = model is None
        if owned:
            from medshield.models.chat import create_chat_model

            model = create_chat_model(config.model.backend, **config.model.kwargs)
        try:
            runner = _Runner(config, model, judges, log, run, attacked)
            size = config.generation.batch_size
            with tqdm(total=len(pending), desc="redteam", unit="row", mininterval=1.0) as bar:
                for start in range(0, len(pending), size):
                    new = runner.batch(pending[start : start + size])
                    run.append_samples(new)  # flushed: an interruption loses this batch at most
                    rows.extend(new)
                    bar.update(len(new))
        finally:
            close = getattr(model, "close", None)
            if owned and callable(close):
                close()

    errors = Counter(f"{r.get('error_stage', '?')}: {r['error']}" for r in rows if r.get("error"))
    check_measured(
        "red-team rows",
        len(rows),
        dict(errors),
        "fix the cause (e.g. start the endpoint) and rerun the same command with --retry-errors",
        log,
    )
    results = summarize_run(config, rows, judges)
    return run.finish(results, kind="redteam", seed=config.seed, report=report)


# --- the summary table ---------------------------------------------------------------------------


def source_label(results: dict[str, Any]) -> str:
    """The item source a run's results name: the source, or for a query file its path, the
    start of its SHA-256 and its number of rows."""
    r = results.get("redteam", results)
    query = r.get("query_file")
    if not query:
        return str(r.get("source", "-"))
    return f"file {query['path']} (sha256 {query['sha256'][:12]}, {query['n_items']} rows)"


def _n(values: dict[str, Any], key: str) -> str:
    metric = values.get(key) or {}
    return str(metric.get("n", 0))


def print_redteam_summary(results: dict[str, Any], console: Any | None = None) -> None:
    """Print the summary tables of a red-teaming run with rich: metrics per attack and per
    modality, the judges' agreement with the held-out labels, latency and errors."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    r = results["redteam"] if "redteam" in results else results
    metrics = r["metrics"]
    columns = [
        ("ASR", "attack_success_rate"),
        ("refusal", "refusal_rate"),
        ("non-answer", "non_answer_rate"),
        ("over-defense", "over_defense_rate"),
        ("over-def. near-miss", "over_defense_near_miss_rate"),
        ("benign acc.", "benign_accuracy"),
    ]
    columns = [c for c in columns if c[1] in metrics["overall"]]
    title = (
        f"{r['model']} on {source_label(r)}, defense {r['defense']}, judge {r['primary_judge']} "
        "(95% bootstrap CI)"
    )

    def metric_table(title: str, group: str, groups: dict[str, Any]) -> Table:
        table = Table(title=title, title_justify="left")
        table.add_column(group)
        for label, _ in columns:
            table.add_column(label)
        table.add_column("n harm.", justify="right")
        table.add_column("n benign", justify="right")
        for name, values in groups.items():
            table.add_row(
                name,
                *(format_metric(values.get(key), 2) for _, key in columns),
                _n(values, "attack_success_rate"),
                _n(values, "over_defense_rate"),
            )
        return table

    groups = {**metrics.get("by_attack", {}), "overall": metrics["overall"]}
    console.print(metric_table(title, "attack", groups))
    by_modality = metrics.get("by_modality", {})
    if len(by_modality) > 1:
        console.print(metric_table("per modality", "modality", by_modality))

    if r.get("judge_agreement"):
        table = Table(title="judge agreement (held-out labelled answers)", title_justify="left")
        for column in ("judge", "accuracy", "kappa", "n"):
            table.add_column(column, justify="left" if column == "judge" else "right")
        for a in r["judge_agreement"]:
            table.add_row(a["judge"], f"{a['accuracy']:.3f}", f"{a['kappa']:.3f}", str(a["n"]))
        console.print(table)

    asr = {
        name: s["overall"]["attack_success_rate"]["value"]
        for name, s in r.get("metrics_by_judge", {}).items()
    }
    if len(asr) > 1:
        console.print(
            "overall ASR by judge: "
            + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in asr.items())
        )
    lat = r["latency"]
    if lat["n"]:
        console.print(
            f"latency per row: mean {lat['mean_s']:.3f} s, median {lat['median_s']:.3f} s "
            f"over {lat['n']} rows"
        )
    n_items = r["n_items"]
    console.print(
        f"{n_items['harmful']} harmful + {n_items['benign']} benign"
        + (f" + {n_items['near_miss']} near-miss" if n_items.get("near_miss") else "")
        + f" items, {r['n_rows']} rows, "
        f"{r['n_errors']} errors" + (f" {r['errors_by_stage']}" if r["n_errors"] else "")
    )
