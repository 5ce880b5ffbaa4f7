"""Benchmark: does a mini-llava read the image? The modality question on held-out images.

VQA-RAD closed (``medshield train-vlm``'s evaluation) asks about findings, which a 64 px image
tower may not resolve. This asks the easier question every instruction-tuned mini-llava was
taught: "What imaging modality is this?", on MedMNIST *test* images (training saw train images
only), ``--per-modality`` per modality found in the data directory. The answer is chosen by
likelihood among the modality titles (``MiniLlava.score`` of each title as the reply; chance is
one over the number of modalities), under three conditions: the item's image, no image, and
another test item's image (a permutation). Differences from the image condition are paired over
the items, with 95% bootstrap intervals::

    python benchmarks/vlm_image_use.py --checkpoint instruct --per-modality 20 --out image_use.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from medshield.commands.train_vlm import modality_choices
from medshield.data import available_modalities, get_modality, load_split
from medshield.eval.metrics import bootstrap_ci
from medshield.models import create_chat_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="instruct", help="shipped name or directory")
    parser.add_argument("--per-modality", type=int, default=20)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    model = create_chat_model("mini-llava", checkpoint=args.checkpoint)
    modalities = available_modalities(args.data_dir)
    titles = [get_modality(m).title for m in modalities]
    images, labels = [], []
    rng = np.random.default_rng(args.seed)
    for label, name in enumerate(modalities):
        split = load_split(name, "test", args.data_dir)
        rows = np.sort(rng.choice(len(split.labels), args.per_modality, replace=False))
        images.extend(split.tensor(rows))
        labels.extend([label] * len(rows))
    other = rng.permutation(len(images))
    conditions = {
        "image": images,
        "no_image": [None] * len(images),
        "shuffled_image": [images[int(j)] for j in other],
    }
    truth = np.array(labels)
    correct = {
        condition: (modality_choices(model, per_item, titles) == truth).astype(np.float64)
        for condition, per_item in conditions.items()
    }
    result: dict = {
        "checkpoint": args.checkpoint,
        "modalities": modalities,
        "items": len(truth),
        "chance": 1 / len(titles),
        "seconds": round(time.time() - started, 1),
    }
    for condition, values in correct.items():
        lo, hi = bootstrap_ci(lambda x: x.mean(-1), values, seed=args.seed, vectorized=True)
        result[condition] = {"accuracy": float(values.mean()), "ci_low": lo, "ci_high": hi}
    for control in ("no_image", "shuffled_image"):
        diff = correct["image"] - correct[control]
        lo, hi = bootstrap_ci(lambda x: x.mean(-1), diff, seed=args.seed, vectorized=True)
        result[f"image_minus_{control}"] = {
            "difference": float(diff.mean()),
            "ci_low": lo,
            "ci_high": hi,
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
