"""Benchmark: what each defense costs per request, with and without prefix caching.

Loads ``mini-llava`` (a saved checkpoint, or one assembled from the shipped weights: ImageNet
EfficientNet-Lite0 tower, an untrained projector and SmolLM2-135M-Instruct) and answers the same
safety-benchmark requests under every defense path, in one process:

* ``undefended``: the requests alone (the model's default, prefix cache on);
* ``self-reminder`` and ``adashield-static``: the prompt baselines;
* ``harmful-only``, ``benign-only``, ``mixed``, ``retrieval``: k demonstrations chosen by each
  selection strategy, prefix cache on (a fixed strategy is one cached prefix; retrieval one per
  selected set, kept in the model's bounded LRU);
* ``mixed-naive`` and ``retrieval-naive``: the same conversations with the prefix recomputed for
  every request (``MiniLlava.prefix_cache = False``).

Every path first answers one untimed warm-up batch of requests that are not timed (so a cached
prefix of the warm-up cannot serve a timed retrieval request); the cache is cleared before it.
Then batches rotate through the paths (and which goes first), so all see the same machine load:
other jobs on the machine slow every path alike and the ratios stay comparable. Latency per
request is a path's timed wall time divided by its number of requests; the ratios are path /
undefended. Greedy replies of each naive path are compared with its cached path (they should be
identical), and the prefix-cache hits and misses of each path are counted::

    python benchmarks/prefix_cache.py --k 8 --n 16 --batch-size 8 --max-new-tokens 16 --threads 1 \\
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

STRATEGIES = ("harmful-only", "benign-only", "mixed", "retrieval")
BASELINES = ("self-reminder", "adashield-static")
NAIVE = {"mixed-naive": "mixed", "retrieval-naive": "retrieval"}
PATHS = ("undefended", *BASELINES, *STRATEGIES, *NAIVE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="saved mini-llava directory (default: a fresh one)")
    parser.add_argument("--k", type=int, default=8, help="demonstration budget")
    parser.add_argument("--n", type=int, default=16, help="timed benchmark requests")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--cache-entries", type=int, default=16, help="prefix cache entries")
    parser.add_argument("--seed", type=int, default=0, help="request sample, demonstrations")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    return parser.parse_args(argv)


def load_model(checkpoint: str | None, seed: int, cache_entries: int) -> MiniLlava:
    """The saved mini-llava, or one built from the shipped weights (untrained projector)."""
    if checkpoint:
        return MiniLlava(checkpoint=checkpoint, prefix_cache_entries=cache_entries)
    torch.manual_seed(seed)
    return MiniLlava(clip="imagenet", lm="smollm2", prefix_cache_entries=cache_entries)


def requests(n: int, seed: int) -> list[list[Message]]:
    """``n`` benchmark requests (harmful and benign, sampled with ``seed``), each with its image."""
    items = build_benchmark()
    if n > len(items):
        raise SystemExit(f"--n {n} is more than the {len(items)} benchmark items")
    chosen = random.Random(seed).sample(items, n)
    return [[Message("user", item.text, [item.load_image()])] for item in chosen]


def conversations_of(args: argparse.Namespace, plain: list[list[Message]]) -> dict[str, Any]:
    """Each path's conversations for the ``plain`` requests."""
    out: dict[str, Any] = {"undefended": plain}
    for name in BASELINES:
        out[name] = create_defense(name).apply_batch(plain)
    for strategy in STRATEGIES:
        defense = create_defense("demonstrations", strategy=strategy, k=args.k, seed=args.seed)
        out[strategy] = defense.apply_batch(plain)
    for path, strategy in NAIVE.items():
        out[path] = out[strategy]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint, args.seed, args.cache_entries)
    size = args.batch_size
    everything = conversations_of(args, requests(args.n + size, args.seed))
    warm = {path: convs[:size] for path, convs in everything.items()}
    conversations = {path: convs[size:] for path, convs in everything.items()}
    prompt_tokens = {
        path: sum(len(model._render(c)[0]) for c in convs) / len(convs)
        for path, convs in conversations.items()
    }
    store = model._prefix_kv
    hits = dict.fromkeys(PATHS, 0)
    misses = dict.fromkeys(PATHS, 0)

    def answer(path: str, batch: list[list[Message]]) -> list[str]:
        model.prefix_cache = path not in NAIVE
        before = store.hits, store.misses
        out = model.generate(batch, max_new_tokens=args.max_new_tokens)
        hits[path] += store.hits - before[0]
        misses[path] += store.misses - before[1]
        return out

    model.clear_prefix_cache()
    cold: dict[str, float] = {}
    for path in PATHS:  # untimed warm-up on other requests; it computes the fixed prefixes
        started = time.perf_counter()
        answer(path, warm[path])
        cold[path] = time.perf_counter() - started
    hits, misses = dict.fromkeys(PATHS, 0), dict.fromkeys(PATHS, 0)
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
    identical = {
        path: sum(a == b for a, b in zip(replies[path], replies[of], strict=True)) / args.n
        for path, of in NAIVE.items()
    }
    return {
        "k": args.k,
        "n": args.n,
        "batch_size": size,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "cache_entries": args.cache_entries,
        "model": args.checkpoint or "fresh mini-llava (imagenet tower, untrained projector)",
        "prompt_tokens_mean": prompt_tokens,
        "reply_tokens_mean": new_tokens,
        "seconds": seconds,
        "latency_per_request_s": per_request,
        "ratio_vs_undefended": {
            path: per_request[path] / per_request["undefended"] for path in PATHS
        },
        "prefix_cache_hits": hits,
        "prefix_cache_misses": misses,
        "cold_batch_s": cold,
        "naive_replies_identical_to_cached": identical,
        "prefix_cache_entries": len(store),
        "prefix_cache_mib": store.nbytes / 2**20,
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
        f"k={result['k']}, {result['n']} requests, batch {result['batch_size']}, "
        f"max_new_tokens {result['max_new_tokens']}, {result['threads']} threads"
    )
    print(
        "| path | prompt tokens | reply tokens | cache hits / misses | s / request | x undefended |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for path in PATHS:
        print(
            f"| {path} | {result['prompt_tokens_mean'][path]:.0f} | "
            f"{result['reply_tokens_mean'][path]:.1f} | "
            f"{result['prefix_cache_hits'][path]} / {result['prefix_cache_misses'][path]} | "
            f"{result['latency_per_request_s'][path]:.3f} | "
            f"{result['ratio_vs_undefended'][path]:.2f} |"
        )
    same = ", ".join(f"{p} {v:.0%}" for p, v in result["naive_replies_identical_to_cached"].items())
    print(
        f"naive replies identical to cached: {same}; cache {result['prefix_cache_entries']} "
        f"entries, {result['prefix_cache_mib']:.1f} MiB"
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
