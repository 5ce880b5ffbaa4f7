"""Benchmark: medshield's PGD against torchattacks' PGD on the same model, inputs and budget.

Both attacks run without random start, so they should compute the same adversarial images (up
to float rounding: torchattacks differentiates the mean loss, medshield the summed per-example
loss). The model is a ``mini-clip`` zero-shot classifier that takes [0, 1] images and normalises
them itself, so torchattacks is given no normalisation either. Batches alternate between the two
implementations, and which one goes first, after an untimed warm-up of each, so both see the same
machine load; the time ratio is medshield / torchattacks.

Needs ``pip install torchattacks`` (``--no-deps`` keeps an installed torch) and MedMNIST data in
``$MEDSHIELD_DATA_DIR/medmnist``::

    python benchmarks/pgd_vs_torchattacks.py --modality chest_xray --n 200 --out pgd.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import medshield
from medshield.attacks import PGD
from medshield.data import get_modality, load_split
from medshield.data.medmnist import class_balanced_indices
from medshield.eval.metrics import bootstrap_ci
from medshield.models import ZeroShotClassifier, create_model, load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modality", default="chest_xray", help="modality name (test split)")
    parser.add_argument("--n", type=int, default=200, help="images (class-balanced)")
    parser.add_argument("--checkpoint", help="saved model directory (default: fresh mini-clip)")
    parser.add_argument("--eps", type=float, default=1.0, help="L-inf budget, /255 units")
    parser.add_argument("--alpha", type=float, default=0.25, help="step size, /255 units")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the image sample and fresh heads"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    return parser.parse_args(argv)


def load_images(modality: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` class-balanced test images in [0, 1] and their labels."""
    split = load_split(modality, "test")
    num_classes = split.modality.num_classes
    per_class = -(-n // num_classes)
    indices = class_balanced_indices(split.labels, per_class, seed)[:n]
    return split.tensor(indices), torch.as_tensor(split.labels[indices])


def accuracy_with_ci(correct: torch.Tensor) -> dict[str, float]:
    values = correct.double().numpy()
    lo, hi = bootstrap_ci(lambda c: c.mean(-1), values, vectorized=True)
    return {"value": float(values.mean()), "ci_low": lo, "ci_high": hi}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torchattacks

    images, labels = load_images(args.modality, args.n, args.seed)
    torch.manual_seed(args.seed)  # a fresh mini-clip has randomly initialised projection heads
    model = load_model(args.checkpoint) if args.checkpoint else create_model("mini-clip")
    classifier = ZeroShotClassifier(model, get_modality(args.modality).prompts()).eval()
    ours = PGD(classifier, eps=args.eps, alpha=args.alpha, steps=args.steps, random_start=False)
    theirs = torchattacks.PGD(
        classifier,
        eps=args.eps / 255,
        alpha=args.alpha / 255,
        steps=args.steps,
        random_start=False,
    )

    with torch.no_grad():  # warm-up pass, and the clean predictions
        clean_pred = torch.cat([classifier(b).argmax(1) for b in images.split(args.batch_size)])
    attacks = [("medshield", ours), ("torchattacks", theirs)]
    for _, attack in attacks:  # untimed warm-up of the backward pass
        attack(images[:2], labels[:2])
    seconds = {"medshield": 0.0, "torchattacks": 0.0}
    adv: dict[str, list[torch.Tensor]] = {"medshield": [], "torchattacks": []}
    batches = zip(images.split(args.batch_size), labels.split(args.batch_size), strict=True)
    for i, (x, y) in enumerate(batches):
        for name, attack in attacks if i % 2 == 0 else attacks[::-1]:  # alternate the order
            start = time.perf_counter()
            adv[name].append(attack(x, y))
            seconds[name] += time.perf_counter() - start
    adv_images = {name: torch.cat(batches) for name, batches in adv.items()}
    with torch.no_grad():
        adv_pred = {
            name: torch.cat([classifier(b).argmax(1) for b in a.split(args.batch_size)])
            for name, a in adv_images.items()
        }
    clean_correct = clean_pred == labels
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": args.checkpoint or "mini-clip (fresh)",
        "n": len(labels),
        "clean_accuracy": accuracy_with_ci(clean_correct),
        "robust_accuracy": {
            name: accuracy_with_ci(clean_correct & (pred == labels))
            for name, pred in adv_pred.items()
        },
        "seconds": seconds,
        "time_ratio_medshield_over_torchattacks": seconds["medshield"] / seconds["torchattacks"],
        "max_abs_difference_of_adversarial_images": float(
            (adv_images["medshield"] - adv_images["torchattacks"]).abs().max()
        ),
        "prediction_agreement": float(
            (adv_pred["medshield"] == adv_pred["torchattacks"]).double().mean()
        ),
        "max_linf_255": {
            name: float((a - images).abs().max() * 255) for name, a in adv_images.items()
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchattacks": torchattacks.__version__,
            "medshield": medshield.__version__,
            "numpy": np.__version__,
        },
        "threads": torch.get_num_threads(),
    }


def print_table(result: dict[str, Any]) -> None:
    def fmt(m: dict[str, float]) -> str:
        return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"

    print(f"model {result['model']}, {result['n']} images, config {result['config']}")
    print(f"clean accuracy: {fmt(result['clean_accuracy'])}")
    print(f"{'implementation':<14} {'robust acc [95% CI]':<26} {'seconds':>8} {'max Linf':>9}")
    for name in ("medshield", "torchattacks"):
        print(
            f"{name:<14} {fmt(result['robust_accuracy'][name]):<26} "
            f"{result['seconds'][name]:>8.2f} {result['max_linf_255'][name]:>8.3f}/255"
        )
    print(
        f"time ratio medshield/torchattacks: {result['time_ratio_medshield_over_torchattacks']:.3f}"
        f"; adversarial images differ by at most "
        f"{result['max_abs_difference_of_adversarial_images']:.2e}; predictions agree on "
        f"{result['prediction_agreement']:.1%}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
