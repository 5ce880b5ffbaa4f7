"""Small run directories for the report tests: a real red-teaming run with a fake chat model
(a few seconds), and hand-written results of every other kind in the formats their writers use."""

from __future__ import annotations

import json
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import torch

from medshield.commands.redteam import RedteamConfig, run_redteam
from medshield.eval.metrics import summarize
from medshield.models.chat import ChatVLM, Conversation
from medshield.registry import CHAT_MODELS
from medshield.runs import Run

SCRIPT = "<script>alert('pwned')</script>"
REFUSAL = "I'm sorry, but I can't help with that request."


class ScriptChat(ChatVLM):
    """Refuses prompts of odd length; otherwise complies with an answer that holds a script."""

    backend = "fake-report"

    def generate(
        self,
        conversations: Sequence[Conversation],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
    ) -> list[str]:
        return [REFUSAL if len(c[-1].text) % 2 else f"Sure. Yes. {SCRIPT}" for c in conversations]

    def score(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> torch.Tensor:
        return torch.zeros(len(conversations))


if "fake-report" not in CHAT_MODELS:
    CHAT_MODELS.register("fake-report", "test double for the report tests")(ScriptChat)


def redteam_config(directory: Path) -> dict[str, Any]:
    """3 harmful chest X-ray items x (direct, figstep) + 3 benign twins, into ``directory/rt``."""
    return {
        "name": "rt",
        "output_dir": str(directory),
        "model": {"backend": "fake-report"},
        "modalities": ["chest_xray"],
        "limit": 3,
        "attacks": ["direct", "figstep"],
        "judges": ["keyword"],
        "judge_agreement": False,
        "generation": {"batch_size": 8, "max_new_tokens": 8},
        "bootstrap_resamples": 50,
    }


def redteam_run(directory: Path) -> Path:
    """The red-teaming run of :func:`redteam_config`, run with the fake model."""
    cfg = RedteamConfig.model_validate(redteam_config(directory))
    run = Run(directory / "rt", cfg)
    run_redteam(cfg, run, log=lambda _: None)
    return run.path


def write_run(directory: Path, results: dict[str, Any], rows: Sequence[dict] = ()) -> Path:
    """A run directory with these results, rows and a small config."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps({**results, "seed": 0}))
    (directory / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "config.yaml").write_text("name: tiny\nseed: 0\n")
    return directory


def evaluate_rows() -> list[dict[str, Any]]:
    """Zero-shot, linear-probe and robust rows over two modalities (accuracy 0.75 / 0.5)."""
    rows = []
    for modality, correct in (("chest_xray", 3), ("breast_ultrasound", 2)):
        for i in range(4):
            label, right = i % 2, i < correct
            scores = [0.8, 0.2] if (label == 0) == right else [0.2, 0.8]
            for task in ("zero_shot", "linear_probe"):
                pred = label if right else 1 - label
                rows.append(
                    {"task": task, "modality": modality, "index": i, "label": label}
                    | {"pred": pred, "scores": scores}
                )
            for eps, robust in ((1.0, right and i == 0), (4.0, False)):
                rows.append(
                    {"task": "robust_zero_shot", "modality": modality, "index": i}
                    | {"attack": "pgd", "eps": eps, "restart": 0}
                    | {"clean_correct": right, "robust_correct": robust}
                )
    return rows


def evaluate_results() -> dict[str, Any]:
    metrics = summarize(evaluate_rows(), n_resamples=50)
    flags = [
        {"name": "budget", "group": "pgd@1", "passed": True, "detail": "largest Linf 1/255"},
        {
            "name": "robust<=clean",
            "group": "pgd@4",
            "passed": False,
            "detail": "robust 0.9 above clean 0.5",
        },
    ]
    return {
        "evaluate": {
            "modalities": ["breast_ultrasound", "chest_xray"],
            "metrics": metrics,
            "sanity": {"chest_xray": flags},
            "skipped": {"vqa_closed/radiology": "VQA-RAD not found"},
        }
    }


def m(value: float, low: float | None = None, high: float | None = None, n: int = 3) -> dict:
    return {"value": value, "ci_low": low, "ci_high": high, "n": n}


def noise_results() -> dict[str, Any]:
    points = [{"ratio": 0.0, "eps": None, "seeds": 2, "zero-shot acc": m(0.812, 0.8, 0.83)}]
    for ratio, acc in ((0.25, 0.701), (1.0, 0.433)):
        for eps in (2.0, 8.0):
            points.append(
                {"ratio": ratio, "eps": eps, "seeds": 2}
                | {"zero-shot acc": m(acc - eps / 100, acc - 0.1, acc + 0.05), "i2t R@1": None}
            )
    return {
        "upstream_modalities": ["chest_xray", "blood_cell"],
        "evaluated_modalities": ["chest_xray", "blood_cell", "breast_ultrasound"],
        "surrogate": "runs/study_noise/surrogate/model",
        "pools": {"2": "pools/eps2", "8": "pools/eps8"},
        "points": points,
    }


def finetune_results() -> dict[str, Any]:
    table = [
        {
            "checkpoint": "base",
            "method": method,
            "modality": "chest_xray",
            "seeds": 1,
            "clean_accuracy": m(clean, clean - 0.1, clean + 0.1, 40),
            "robust/pgd1@2": m(robust, robust - 0.1, robust + 0.1, 40),
            "robust/worst@2": m(robust, robust - 0.1, robust + 0.1, 40),
            "trainable_params": params,
            "train_wall_s": 3.5,
            "flops_ratio": 1.0,
            "latency_ratio": 1.02,
            "sanity_failed": failed,
        }
        for method, clean, robust, params, failed in (
            ("linear-probe", 0.731, 0.112, 514, []),
            ("ran", 0.762, 0.413, 8_320, ["zero-gradients(pgd1@2)"]),
        )
    ]
    return {
        "modalities": ["chest_xray"],
        "methods": ["linear-probe", "ran"],
        "checkpoints": ["base"],
        "cells": 2,
        "table": table,
        "plots": [],
    }


def finetune_run_results() -> dict[str, Any]:
    """What ``medshield finetune`` writes under ``finetune`` (a study cell: at the top level)."""
    return {
        "method": "lora",
        "modality": "chest_xray",
        "report": {
            "method": "lora",
            "paper": "Hu et al. ICLR 2022 (LoRA)",
            "trainable_params": 329_728,
            "total_params": 26_839_939,
            "train_items": 204,
            "val_items": 52,
            "best_step": 14,
            "train_wall_s": 41.7,
            "overhead": {"flops_ratio": 1.0, "latency_ratio": 1.152},
            "history": [
                {"step": 7, "epoch": 0, "lr": 0.0005, "loss": 0.6132, "val_accuracy": 0.8077},
                {"step": 14, "epoch": 1, "lr": 0.0005, "loss": 0.4207, "val_accuracy": 0.9231},
            ],
        },
        "metrics": {
            "clean_accuracy": m(0.84, 0.77, 0.91, 100),
            "robust_accuracy/worst@2": m(0.02, 0.0, 0.05, 100),
        },
        "sanity": [
            {"name": "budget", "group": "pgd10@2", "passed": True, "detail": "ok"},
            {"name": "uses image", "group": "shuffled", "passed": False, "detail": "0.5 vs 0.5"},
        ],
        "finetuned_dir": "runs/ft/finetuned",
        "device": "cpu",
    }


class Links(HTMLParser):
    """Every src/href value, every <script> and <link> tag, and the <img>/<table> counts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.tags: dict[str, int] = {}
        self.script_src: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.urls.append(value)
                if tag == "script":
                    self.script_src.append(value)


def parse(html: str) -> Links:
    links = Links()
    links.feed(html)
    return links
