"""Benchmark: fine-tuning study cells per hour, the code before issue 22's speed-ups against now.

Runs the same cells of the *reduced* fine-tuning study (the settings of docs/studies/throughput.md,
written out in ``FINETUNE``, ``ROBUST`` and ``ATTACKS`` below) with two code paths, one after the
other and alternating which goes first from round to round, so both see the same machine:

* ``old``: the source tree of ``--old-ref`` (default: the commit before the speed-ups),
  extracted with ``git archive`` and put first on ``PYTHONPATH``;
* ``new``: this checkout's ``src`` (early stopping of the evaluation attacks on, the base model
  loaded once per worker, evaluation on a copy with LoRA merged and BatchNorm folded, weights
  in ``channels_last``; ``--precision bf16`` only here).

Each path runs as ``python -m medshield.commands.cli study finetune`` in a fresh output folder, with
``workers`` processes; its wall time (process start included, as a study pays it) gives cells
per hour, and the ratio new / old is the speed-up. The CPU time of the study and its cell
processes gives cells per CPU-hour too, a ratio that other jobs on the machine distort less.
Every accuracy in the cells' ``results.json`` (clean, majority, shuffled and each
``robust_accuracy/*``) is compared between the paths: the largest difference is printed with
the cell and metric. Early stopping can only lower a robust
accuracy (see :class:`medshield.attacks.base.Attack`); a difference is the last bits of the
arithmetic on smaller batches flipping an image at the decision boundary.

    OMP_NUM_THREADS=1 python benchmarks/study_throughput.py --methods lora,adapter \\
        --workers 2 --out study_throughput.json
    python benchmarks/study_throughput.py --device cuda --workers 4 --precision bf16  # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OLD_REF = "ffcf54c1b8109c6d90889d4341d8f1f7bd2f096a"
"""main before issue 22's speed-ups (2026-12-05): every attack step on every image."""

FINETUNE = {
    "epochs": 10,
    "batch_size": 32,
    "lr": 0.001,
    "max_train_items": 256,
    "adversary": {"eps": 2, "steps": 10},
}
ROBUST = {"eps": [1, 2], "max_test_items": 100, "retrieval": False}
ATTACKS = {
    # the same attacks in each code path's config form (issue 24 replaced the old fields)
    "old": {"pgd_steps": [10], "restarts": 1, "apgd_steps": 20},
    "new": {
        "attacks": [
            {"name": "pgd", "steps": 10},
            {"name": "apgd-ce", "steps": 20},
            {"name": "apgd-dlr", "steps": 20},
        ]
    },
}
"""The reduced study of docs/studies/throughput.md: 256 training items, 10 epochs at a constant
learning rate, PGD-10 (one restart), APGD-CE-20 and APGD-DLR-20 at 1 and 2 /255 on 100 test
images, no retrieval, no VQA; the base model is ``mini-clip`` built from its seed
(``checkpoints: {base: null}``). Written out here, not read from configs/, so that both code
paths run the same study."""

METHODS: dict[str, dict[str, Any]] = {
    "linear-probe": {"method": "linear-probe"},
    "lora": {"method": "lora", "kwargs": {"rank": 8}, "finetune": {"lr": 0.0005}},
    "adapter": {"method": "adapter", "kwargs": {"reduction": 8}},
    "adv-lora": {"method": "adv-lora", "kwargs": {"rank": 8}, "finetune": {"lr": 0.0005}},
    "ran": {"method": "ran"},
}
ACCURACIES = ("clean_accuracy", "majority_accuracy", "shuffled_image_accuracy", "robust_accuracy/")


def extract_old(ref: str, into: Path) -> Path:
    """The ``src`` tree of ``ref`` under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "src"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def cpu_seconds() -> float:
    """User + system CPU time of this process's finished children (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def old_name(metric: str, old_metrics: dict[str, float]) -> str:
    """A new path's metric as the old path names it: a lone PGD entry of an attack list is
    ``pgd`` since issue 24, where the default old ref says ``pgd10``."""
    if metric in old_metrics:
        return metric
    return metric.replace("robust_accuracy/pgd@", "robust_accuracy/pgd10@")


def attack_form(src: Path) -> str:
    """Which form of ``ATTACKS`` the source tree ``src`` reads: ``new`` (attack lists, issue 24)
    or ``old`` (the fields before them)."""
    config = (src / "medshield" / "config.py").read_text()
    return "new" if "AttackList" in config else "old"


def cli_module(src: Path) -> str:
    """The CLI module of the source tree ``src``: it moved from ``medshield.cli`` to
    ``medshield.commands.cli`` after the default old ref."""
    moved = (src / "medshield" / "commands").is_dir()
    return "medshield.commands.cli" if moved else "medshield.cli"


def run_study(src: Path, config: dict[str, Any], out: Path) -> tuple[float, float]:
    """Run the study ``config`` with ``src`` first on the path; its wall time and the CPU time
    of the study and its cell processes, in seconds."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    out.mkdir(parents=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(json.dumps({**config, "output_dir": str(out)}))  # JSON is YAML
    command = [sys.executable, "-m", cli_module(src), "study", "finetune", "--config", str(path)]
    start, cpu_start = time.perf_counter(), cpu_seconds()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    if done.returncode != 0:
        sys.exit(f"{src} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall, cpu


def cell_accuracies(out: Path) -> dict[str, dict[str, float]]:
    """cell -> accuracy metric -> value, from every cell's results.json."""
    cells = {}
    for path in sorted((out / "study_finetune" / "cells").glob("*/results.json")):
        metrics = json.loads(path.read_text())["metrics"]
        cells[path.parent.name] = {
            k: v["value"] for k, v in metrics.items() if k.startswith(ACCURACIES)
        }
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="lora,adapter", help=f"of {', '.join(METHODS)}")
    parser.add_argument("--modalities", default="chest_xray")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", help="the new path's (fp32 or bf16)")
    parser.add_argument("--rounds", type=int, default=1, help="old/new pairs, order alternating")
    parser.add_argument("--old-ref", default=OLD_REF)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    study = {
        "name": "study_finetune",
        "checkpoints": {"base": None},
        "methods": [METHODS[m] for m in args.methods.split(",")],
        "modalities": args.modalities.split(","),
        "vqa_closed": False,
        "seeds": [int(s) for s in args.seeds.split(",")],
        "finetune": FINETUNE,
        "workers": args.workers,
        "device": args.device,
    }
    walls: dict[str, list[float]] = {"old": [], "new": []}
    cpus: dict[str, list[float]] = {"old": [], "new": []}
    accuracies: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="study_throughput_") as tmp:
        sources = {"old": extract_old(args.old_ref, Path(tmp) / "old"), "new": REPO / "src"}
        configs = {
            path: {**study, "robust": {**ROBUST, **ATTACKS[attack_form(src)]}}
            for path, src in sources.items()
        }
        if args.precision != "fp32":
            configs["new"]["precision"] = args.precision
        for round_ in range(args.rounds):
            for path in ("old", "new") if round_ % 2 == 0 else ("new", "old"):
                out = Path(tmp) / f"{path}{round_}"
                wall, cpu = run_study(sources[path], configs[path], out)
                walls[path].append(wall)
                cpus[path].append(cpu)
                accuracies[path] = cell_accuracies(out)
                print(f"round {round_ + 1} {path}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    cells = len(accuracies["new"])
    rates = {p: cells * len(w) / sum(w) * 3600 for p, w in walls.items()}
    cpu_rates = {p: cells * len(c) / sum(c) * 3600 for p, c in cpus.items()}
    diffs = []
    for cell, metrics in accuracies["new"].items():
        old = accuracies["old"][cell]
        for name, value in metrics.items():
            if (before := old_name(name, old)) in old:
                diffs.append((abs(value - old[before]), cell, name))
    if not any("robust_accuracy/" in name for _, _, name in diffs):
        sys.exit("no robust accuracy is named alike in both paths: nothing to compare")
    largest = max(diffs)
    result: dict[str, Any] = {
        "settings": {**vars(args), "out": str(args.out), "configs": configs},
        "cells": cells,
        "wall_s": walls,
        "cpu_s": cpus,
        "cells_per_hour": rates,
        "cells_per_cpu_hour": cpu_rates,
        "ratio": rates["new"] / rates["old"],
        "cpu_ratio": cpu_rates["new"] / cpu_rates["old"],
        "accuracies_compared": len(diffs),
        "largest_accuracy_difference": {
            "value": largest[0],
            "cell": largest[1],
            "metric": largest[2],
        },
        "accuracies": accuracies,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
    }
    print(f"{cells} cells, {args.workers} workers, device {args.device}")
    for path in ("old", "new"):
        print(
            f"  {path}: {rates[path]:.1f} cells/hour (wall {walls[path]} s), "
            f"{cpu_rates[path]:.1f} cells per CPU-hour (CPU {cpus[path]} s)"
        )
    print(f"  ratio new/old: {result['ratio']:.2f} (wall), {result['cpu_ratio']:.2f} (CPU time)")
    print(
        f"  largest accuracy difference: {largest[0]:.4f} ({largest[2]}, {largest[1]}), "
        f"of {len(diffs)} compared"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
