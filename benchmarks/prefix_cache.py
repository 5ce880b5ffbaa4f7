"""Benchmark: what the demonstration defense costs per request, with and without prefix caching.

Loads ``mini-llava`` (a saved checkpoint, or one assembled from the shipped weights: ImageNet
EfficientNet-Lite0 tower, an untrained projector and SmolLM2-135M-Instruct), builds k synthetic
demonstrations with the ``demonstrations`` defense under a fixed selection, and answers the same
safety-benchmark requests three ways in one run:

* ``undefended``: the requests alone (the model's default, prefix cache on);
* ``defended-cached``: with the demonstrations, their KV cache computed once and reused;
* ``defended-naive``: with the demonstrations, recomputed for every request
  (``MiniLlava.prefix_cache = False``).

Batches rotate through the three paths (and which goes first) after an untimed warm-up of each, so
all see the same machine load. The prefix cache is cleared before the warm-up, whose time
(``cold_batch_s``) includes the one-time prefix computation. Latency per request is the timed
wall time of a path divided by its number of requests; the ratios are defended / undefended.
Greedy replies of the cached and naive paths are compared (they should be identical)::

    python benchmarks/prefix_cache.py --k 8 --n 32 --batch-size 8 --max-new-tokens 16 --threads 1 \\
        --out prefix_cache.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

import medshield
from medshield.data.safety import build_benchmark
from medshield.defense import create_defense
from medshield.models import Message
from medshield.models.mini_llava import MiniLlava

PATHS = ("undefended", "defended-cached", "defended-naive")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="saved mini-llava directory (default: a fresh one)")
    parser.add_argument("--k", type=int, default=8, help="demonstration budget")
    parser.add_argument("--strategy", default="mixed", help="a fixed selection strategy")
    parser.add_argument("--n", type=int, default=32, help="benchmark requests")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="request sample, demonstrations")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.strategy == "retrieval":
        parser.error("--strategy must be a fixed selection (harmful-only, benign-only, mixed)")
    return args


def load_model(checkpoint: str | None, seed: int) -> MiniLlava:
    """The saved mini-llava, or one built from the shipped weights (untrained projector)."""
    if checkpoint:
        return MiniLlava.load(checkpoint)
    torch.manual_seed(seed)
    return MiniLlava(clip="imagenet", lm="smollm2")


def requests(n: int, seed: int) -> list[list[Message]]:
    """``n`` benchmark requests (harmful and benign, sampled with ``seed``), each with its image."""
    items = build_benchmark()
    if n > len(items):
        raise SystemExit(f"--n {n} is more than the {len(items)} benchmark items")
    chosen = random.Random(seed).sample(items, n)
    return [[Message("user", item.text, [item.load_image()])] for item in chosen]


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint, args.seed)
    defense = create_defense("demonstrations", strategy=args.strategy, k=args.k, seed=args.seed)
    plain = requests(args.n, args.seed)
    conversations = {
        "undefended": plain,
        "defended-cached": defense.apply_batch(plain),
        "defended-naive": defense.apply_batch(plain),
    }
    prompt_tokens = {
        path: sum(len(model._render(c)[0]) for c in convs) / len(convs)
        for path, convs in conversations.items()
    }

    def answer(path: str, batch: list[list[Message]]) -> list[str]:
        model.prefix_cache = path != "defended-naive"
        return model.generate(batch, max_new_tokens=args.max_new_tokens)

    size = args.batch_size
    model.clear_prefix_cache()
    cold: dict[str, float] = {}
    for path in PATHS:  # untimed warm-up; the first cached batch computes the prefix
        started = time.perf_counter()
        answer(path, conversations[path][:size])
        cold[path] = time.perf_counter() - started
    seconds = dict.fromkeys(PATHS, 0.0)
    replies: dict[str, list[str]] = {path: [] for path in PATHS}
    for b, start in enumerate(range(0, args.n, size)):
        shift = b % len(PATHS)
        for path in PATHS[shift:] + PATHS[:shift]:
            batch = conversations[path][start : start + size]
            started = time.perf_counter()
            out = answer(path, batch)
            seconds[path] += time.perf_counter() - started
            replies[path].extend(out)
    model.prefix_cache = True
    per_request = {path: seconds[path] / args.n for path in PATHS}
    new_tokens = {
        path: sum(len(model._encode_text(r)) for r in replies[path]) / args.n for path in PATHS
    }
    pairs = zip(replies["defended-cached"], replies["defended-naive"], strict=True)
    same = sum(a == b for a, b in pairs)
    return {
        "k": args.k,
        "strategy": args.strategy,
        "n": args.n,
        "batch_size": size,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "model": args.checkpoint or "fresh mini-llava (imagenet tower, untrained projector)",
        "prompt_tokens_mean": prompt_tokens,
        "reply_tokens_mean": new_tokens,
        "seconds": seconds,
        "latency_per_request_s": per_request,
        "ratio_vs_undefended": {
            "defended-cached": per_request["defended-cached"] / per_request["undefended"],
            "defended-naive": per_request["defended-naive"] / per_request["undefended"],
        },
        "cold_batch_s": cold,
        "cached_replies_identical_to_naive": same / args.n,
        "prefix_cache_entries": len(model._prefix_kv),
        "prefix_cache_mib": model._prefix_kv.nbytes / 2**20,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "medshield": medshield.__version__,
        },
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"k={result['k']} ({result['strategy']}), {result['n']} requests, batch "
        f"{result['batch_size']}, max_new_tokens {result['max_new_tokens']}, "
        f"{result['threads']} threads"
    )
    print("| path | prompt tokens | reply tokens | s / request | x undefended |")
    print("| --- | --- | --- | --- | --- |")
    for path in PATHS:
        ratio = result["ratio_vs_undefended"].get(path, 1.0)
        print(
            f"| {path} | {result['prompt_tokens_mean'][path]:.0f} | "
            f"{result['reply_tokens_mean'][path]:.1f} | "
            f"{result['latency_per_request_s'][path]:.3f} | {ratio:.2f} |"
        )
    print(
        f"cached replies identical to naive: {result['cached_replies_identical_to_naive']:.0%}; "
        f"cold first cached batch {result['cold_batch_s']['defended-cached']:.2f} s; "
        f"cache {result['prefix_cache_entries']} entry, {result['prefix_cache_mib']:.1f} MiB"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print_table(result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
