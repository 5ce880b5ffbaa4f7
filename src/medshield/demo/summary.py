"""One line of headline figures per stage of ``medshield demo``."""

from __future__ import annotations

import math
from typing import Any


def fmt_metric(m: dict[str, Any] | None, digits: int = 2) -> str:
    """``value [low, high]`` of a metric dict; ``-`` when it has no value."""
    if not isinstance(m, dict):
        return "-"
    value = m.get("value", m.get("accuracy"))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    low, high = m.get("ci_low"), m.get("ci_high")
    if low is None or high is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def headline_text(record: dict[str, Any]) -> str:
    """One line with a stage's headline figures (95% CIs in brackets)."""
    h, kind = record["headline"], record["kind"]
    if kind == "pretrain":
        return (
            f"zero-shot accuracy {fmt_metric(h['zero_shot_accuracy'])} (mean of "
            f"{h['modalities']} modalities), pretrained on {h['train_pairs']:,} pairs"
            + (" (noisy)" if h.get("noisy") else "")
        )
    if kind == "noise":
        return (
            f"{h['perturbed']:,} of {h['rows']:,} pairs adversarial ({h['attack']}, eps "
            f"{h['eps']:g}/255, max L-inf {h['max_linf_255']:.2f}/255)"
        )
    if kind == "finetune":
        robust = ", ".join(
            f"robust@{eps}/255 {fmt_metric(m)}" for eps, m in h["robust_accuracy"].items()
        )
        return (
            f"clean {fmt_metric(h['clean_accuracy'])}, {robust}; "
            f"{h['trainable_params']:,} trainable parameters"
        )
    if kind == "vlm":
        return (
            f"VQA-RAD closed ({h['vqa_closed_n']} questions) {fmt_metric(h['vqa_closed_image'])} "
            f"with the image, {fmt_metric(h['vqa_closed_no_image'])} without"
        )
    return (
        f"ASR {fmt_metric(h['attack_success_rate'])}, over-defense "
        f"{fmt_metric(h['over_defense_rate'])}, benign accuracy "
        f"{fmt_metric(h['benign_accuracy'])}"
    )
