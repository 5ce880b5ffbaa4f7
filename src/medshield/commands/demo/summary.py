"""One line of headline figures per stage of ``medshield demo``."""

from __future__ import annotations

from typing import Any

from medshield.eval.metrics import format_metric


def headline_text(record: dict[str, Any]) -> str:
    """One line with a stage's headline figures (95% CIs in brackets)."""
    h, kind = record["headline"], record["kind"]
    if kind == "pretrain":
        return (
            f"zero-shot accuracy {format_metric(h['zero_shot_accuracy'], 2)} (mean of "
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
            f"robust@{eps}/255 {format_metric(m, 2)}" for eps, m in h["robust_accuracy"].items()
        )
        return (
            f"clean {format_metric(h['clean_accuracy'], 2)}, {robust}; "
            f"{h['trainable_params']:,} trainable parameters"
        )
    if kind == "vlm":
        return (
            f"VQA-RAD closed ({h['vqa_closed_n']} questions) "
            f"{format_metric(h['vqa_closed_image'], 2)} with the image, "
            f"{format_metric(h['vqa_closed_no_image'], 2)} without"
        )
    return (
        f"ASR {format_metric(h['attack_success_rate'], 2)}, over-defense "
        f"{format_metric(h['over_defense_rate'], 2)}, benign accuracy "
        f"{format_metric(h['benign_accuracy'], 2)}"
    )
