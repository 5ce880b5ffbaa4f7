"""Load test of ``medshield serve`` on loopback: errors, latency percentiles and throughput.

A closed-loop load generator: ``--concurrency`` clients (asyncio + httpx) send ``--requests``
chat-completions requests in all, each a user turn with text and ``--images`` PNG data URLs,
and wait for each reply before sending the next. An error is any exception or a reply that is
not HTTP 200 with ``choices[0].message.content``; the target is 0.

The server under load is, by default, ``medshield serve`` with a fake backend (``--fake-ms`` per
``generate`` call, whatever the batch size, like one batched forward pass) behind the
``demonstrations`` defense, started in a child process (its own interpreter, so client and
server do not share a GIL). ``--config configs/serve.yaml`` serves a real configured backend in
the child instead, and ``--url`` loads a server that is already running::

    python benchmarks/serve_load.py --requests 200 --concurrency 16 --out serve_load.json
    python benchmarks/serve_load.py --config configs/serve.yaml --requests 20 --concurrency 4
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model mini-llava
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from importlib.metadata import version
from typing import Any

import httpx
import numpy as np
from PIL import Image


def make_fake_app(args: argparse.Namespace) -> Any:
    """The proxy over a fake backend that sleeps ``args.fake_ms`` per ``generate`` call."""
    import torch

    from medshield.commands.serve import ServeLimits, create_app
    from medshield.defense import create_defense
    from medshield.models.chat import ChatVLM, Conversation

    class FakeVLM(ChatVLM):
        """Replies after a fixed delay per batch, reporting what it received."""

        backend = "fake"

        def generate(
            self,
            conversations: Sequence[Conversation],
            max_new_tokens: int = 128,
            temperature: float = 0.0,
        ) -> list[str]:
            time.sleep(args.fake_ms / 1000)
            return [
                f"{len(c)} messages, {sum(len(m.images) for m in c)} images" for c in conversations
            ]

        def score(
            self, conversations: Sequence[Conversation], continuations: Sequence[str]
        ) -> torch.Tensor:
            raise NotImplementedError("the fake backend does not score")

    kwargs = {"strategy": "mixed", "k": args.k} if args.defense == "demonstrations" else {}
    limits = ServeLimits(
        max_concurrency=args.max_concurrency,
        max_batch_size=args.max_batch_size,
        max_queue=max(256, args.concurrency),
    )
    return create_app(FakeVLM(), create_defense(args.defense, **kwargs), "fake", limits)


def serve_only(args: argparse.Namespace) -> None:
    """Child process: serve, print the base URL on stdout, stop when stdin closes."""
    from medshield.commands.serve import build_app, load_serve_config, serving

    if args.config:
        # latency does not depend on training: an untrained mini-llava is a fair load
        app = build_app(load_serve_config(args.config, args.set), allow_untrained=True)
    else:
        app = make_fake_app(args)
    with serving(app) as url:
        print(url, flush=True)
        sys.stdin.read()


def start_child(args: argparse.Namespace, argv: Sequence[str]) -> tuple[subprocess.Popen, str]:
    """Start this script with ``--serve-only`` and the same settings; (process, base URL)."""
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve-only", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    url = child.stdout.readline().strip()
    if not url.startswith("http"):
        child.kill()
        raise SystemExit(f"the server did not start (exit code {child.wait()})")
    return child, url


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """One chat request: a user turn with text and ``args.images`` random PNG images."""
    rng = np.random.default_rng(0)
    parts: list[dict[str, Any]] = []
    for _ in range(args.images):
        pixels = rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        parts.append({"type": "image_url", "image_url": {"url": url}})
    parts.append({"type": "text", "text": "Which imaging modality is this, and is it normal?"})
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
    }
    if args.model:
        body["model"] = args.model
    return body


async def run_load(
    url: str, body: dict[str, Any], requests: int, concurrency: int, timeout: float = 300.0
) -> dict[str, Any]:
    """Send ``requests`` requests from ``concurrency`` closed-loop clients; the summary.

    Returns:
        ``requests``, ``concurrency``, ``errors``, ``error_kinds`` (status or exception name ->
        count), ``latency_ms`` (p50/p90/p99/mean/max of the successful requests),
        ``throughput_rps`` (successful requests per second of wall time) and ``wall_s``.
    """
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    remaining = iter(range(requests))
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            for _ in remaining:
                start = time.perf_counter()
                try:
                    response = await client.post(endpoint, json=body)
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                if response.status_code != 200:
                    errors[f"HTTP {response.status_code}"] += 1
                    continue
                content = response.json()["choices"][0]["message"].get("content")
                if not isinstance(content, str):
                    errors["no content"] += 1
                    continue
                latencies.append(1000 * (time.perf_counter() - start))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ms = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return {
        "requests": requests,
        "concurrency": concurrency,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "latency_ms": {
            "p50": round(float(np.percentile(ms, 50)), 2),
            "p90": round(float(np.percentile(ms, 90)), 2),
            "p99": round(float(np.percentile(ms, 99)), 2),
            "mean": round(float(ms.mean()), 2),
            "max": round(float(ms.max()), 2),
        },
        "throughput_rps": round(len(latencies) / wall, 2),
        "wall_s": round(wall, 3),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="load a server that is already running at this base URL")
    target.add_argument("--config", help="serve this `medshield serve` YAML config in a child")
    parser.add_argument("--set", action="append", default=[], help="override in --config")
    parser.add_argument("--requests", type=int, default=200, help="requests in all")
    parser.add_argument("--concurrency", type=int, default=16, help="clients at once")
    parser.add_argument("--images", type=int, default=1, help="PNG images per request")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request")
    parser.add_argument("--model", help="model name to send (default: none, any is accepted)")
    parser.add_argument("--timeout", type=float, default=300.0, help="client time-out (s)")
    fake = parser.add_argument_group("fake backend (neither --url nor --config)")
    fake.add_argument("--fake-ms", type=float, default=20.0, help="ms per generate call")
    fake.add_argument("--defense", default="demonstrations", help="defense name")
    fake.add_argument("--k", type=int, default=4, help="demonstrations (mixed strategy)")
    fake.add_argument("--max-concurrency", type=int, default=1, help="generate calls at once")
    fake.add_argument("--max-batch-size", type=int, default=8, help="conversations per call")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.images < 0:
        parser.error("--requests and --concurrency must be >= 1, --images >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the load test; print and return (and with ``--out`` write) the results."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.serve_only:
        serve_only(args)
        return {}
    child = None
    url = args.url
    if url is None:
        child, url = start_child(args, argv)
    try:
        results = asyncio.run(
            run_load(url, request_body(args), args.requests, args.concurrency, args.timeout)
        )
    finally:
        if child is not None:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(timeout=60)
    server = args.url or (f"config {args.config}" if args.config else "fake backend")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "serve_only")}
    report = {
        "server": server,
        "settings": settings,
        "results": results,
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            **{p: version(p) for p in ("medshield", "fastapi", "uvicorn", "httpx")},
        },
    }
    lat = results["latency_ms"]
    print(
        f"{server}: {results['requests']} requests, {results['concurrency']} concurrent: "
        f"{results['errors']} errors, latency p50 {lat['p50']} ms, p90 {lat['p90']} ms, "
        f"p99 {lat['p99']} ms, {results['throughput_rps']} req/s ({results['wall_s']} s)"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
