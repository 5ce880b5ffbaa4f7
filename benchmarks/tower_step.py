"""Benchmark: one step of the ``mini-clip`` image tower on the CPU, as training and as an attack
take it, in the forms issue 22 compares.

* ``train``: a training step (train mode, every weight trainable, forward + backward of a
  batch of 32), with the tower in the default (NCHW) memory format and in ``channels_last``.
* ``attack``: an attack step (eval mode, weights frozen, forward + backward to the input of a
  batch of 64, as the evaluation attacks take it), plain, with each BatchNorm folded into its
  convolution (:func:`medshield.models.mini_clip.fold_batchnorm`), and folded in
  ``channels_last`` (the form of :func:`medshield.train.finetune.deploy.evaluation_copy`).

The forms of one kind run interleaved, ``--repeats`` times each, and the medians are compared in
this one run; the largest relative difference of the attack's input gradient from the plain
form's is printed too (the folded forms compute the same function up to float rounding).

    OMP_NUM_THREADS=1 python benchmarks/tower_step.py --out tower_step.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from medshield.models.mini_clip import MiniClip, fold_batchnorm


def step_time(step: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def input_grad(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = images.clone().requires_grad_(True)
    model.encode_image(x).sum().backward()
    return x.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = MiniClip(pretrained=True)  # 64 px, the study's tower

    train_forms = {"nchw": copy.deepcopy(base).train()}
    train_forms["channels_last"] = copy.deepcopy(base).train().to(memory_format=torch.channels_last)
    attack_forms = {"plain": copy.deepcopy(base).eval()}
    folded = copy.deepcopy(base).eval()
    fold_batchnorm(folded.image_tower)
    attack_forms["folded"] = folded
    attack_forms["folded_channels_last"] = copy.deepcopy(folded).to(
        memory_format=torch.channels_last
    )
    for model in attack_forms.values():
        model.requires_grad_(False)

    train_images, attack_images = torch.rand(32, 3, 64, 64), torch.rand(64, 3, 64, 64)
    steps = {
        **{("train", n): (lambda m=m: input_grad(m, train_images)) for n, m in train_forms.items()},
        **{
            ("attack", n): (lambda m=m: input_grad(m, attack_images))
            for n, m in attack_forms.items()
        },
    }
    grads = {key: step() for key, step in steps.items() if key[0] == "attack"}  # and warm-up
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(args.repeats):
        for key, step in steps.items():
            times[key].append(step_time(step))
    median = {key: statistics.median(t) for key, t in times.items()}
    plain = grads[("attack", "plain")]
    result = {
        "median_s": {f"{kind}/{name}": t for (kind, name), t in median.items()},
        "speed_up": {
            "train/channels_last": median[("train", "nchw")] / median[("train", "channels_last")],
            **{
                f"attack/{name}": median[("attack", "plain")] / median[("attack", name)]
                for name in ("folded", "folded_channels_last")
            },
        },
        "attack_grad_relative_difference": {
            name: float((grads[("attack", name)] - plain).norm() / plain.norm())
            for name in ("folded", "folded_channels_last")
        },
        "settings": {"repeats": args.repeats, "threads": torch.get_num_threads()},
    }
    for key, value in result["median_s"].items():
        print(f"  {key}: {value:.3f} s per step")
    for key, value in result["speed_up"].items():
        print(f"  speed-up {key}: {value:.2f}x")
    for key, value in result["attack_grad_relative_difference"].items():
        print(f"  input gradient, {key} vs plain: relative difference {value:.1e}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
