"""Serving precision: ViT-B requests/s with today's fp32 default against the new auto default, and the
forward alone at the served precision and batch, from one run.

    python benchmarks/serve_precision.py [--requests 24] [--concurrency 8] [--size 480] [--compile]
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/serve_precision.py   # no native bf16

A config-built ViT-B/16 at 224 px (random weights, a random LoRA adapter) is served by a real
``visionlora serve`` on loopback, once with ``--precision fp32`` (the old default) and once with
default settings (``--precision auto``); ``--concurrency`` clients send ``--requests`` PNGs of
``--size`` px, one image per request. The forward alone runs in a fresh process: the run loaded
with ``--precision auto`` as predict loads it, timed at batch ``--concurrency`` on preprocessed
inputs, and in fp32 beside it. ``--compile`` adds a server with ``--compile`` (its warm-up is read from /v1/models).

Ratios: new default / old default (target 3.5x where bf16 is native), and served requests/s /
forward-alone images/s at the same precision and batch (target 0.8x). Under the AVX2 cap auto picks
fp32, and the new default should be no slower than the old one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import median_seconds, report, run_isolated, table  # noqa: E402
from serve import load_test, make_runs, png, post, start_server  # noqa: E402


def forward_worker(run: str, batch: int, precision: str) -> None:
    """Images/s of the run's forward alone (as ``predict --precision PRECISION`` loads it), batch ``batch``;
    ``autocast``: the fp32 model under bf16 autocast (the server's bf16 before weights were cast)."""
    from contextlib import nullcontext

    import torch

    import visionlora
    from visionlora.deploy.precision import generated_images, model_inputs

    loaded = visionlora.load(run, device="cpu", precision="fp32" if precision == "autocast" else precision)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast" else nullcontext()
    images = generated_images(batch)
    inputs = model_inputs(loaded.task, loaded.processor, loaded.info, images)

    def step() -> None:
        with torch.inference_mode(), autocast:
            loaded.model(**inputs)

    seconds = median_seconds(step, steps=3, warmup=1)
    report({"asked": precision, "precision": "bf16 autocast" if precision == "autocast" else loaded.precision.name,
            "images/s": batch / seconds})


def serve_row(label: str, run: Path, image: bytes, args, *extra: str) -> dict:
    """One server's requests/s (after a warm-up request), with the precision and warm-up it reports."""
    started = time.perf_counter()
    process, url = start_server(run, *extra)
    ready = time.perf_counter() - started
    try:
        post(url, image)
        model = json.loads(urllib.request.urlopen(url.rsplit("/m/", 1)[0], timeout=60).read())["models"][0]
        measured = load_test(url, image, args.concurrency, args.requests)
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {"server": label, "precision": model["precision"], "ready s": ready,
            "compile warm-up s": model.get("compile_warmup_s") or "", **measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=24, help="requests per server")
    parser.add_argument("--concurrency", type=int, default=8, help="clients at once (and the forward's batch)")
    parser.add_argument("--size", type=int, default=480, help="side of the PNGs sent, in pixels")
    parser.add_argument("--compile", action="store_true", help="also a server with --compile")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        forward_worker(args.rest[0], int(args.rest[1]), args.rest[2])
        return
    cap = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ}
    print(f"ViT-B/16 224 px, {args.concurrency} clients, {args.requests} requests of {args.size} px PNGs; "
          f"ISA cap: {cap or 'none'}")
    with tempfile.TemporaryDirectory() as tmp:
        run = make_runs(Path(tmp), "vit-base", 1, 224)[0]
        image = png(args.size)
        rows = [serve_row("serve --precision fp32 (old default)", run, image, args, "--precision", "fp32"),
                serve_row("serve (new default: auto)", run, image, args)]
        if args.compile:
            rows.append(serve_row("serve --compile", run, image, args, "--compile"))
        forward, old_forward, autocast = (run_isolated(__file__, [str(run), str(args.concurrency), precision])
                                          for precision in ("auto", "fp32", "autocast"))
    print(table(rows, ["server", "precision", "ready s", "compile warm-up s", "requests/s", "p50 ms", "p99 ms"]))
    old, new = rows[0]["requests/s"], rows[1]["requests/s"]
    for alone in (forward, old_forward, autocast):
        print(f"forward alone, {alone['asked']} ({alone['precision']}), batch {args.concurrency}: "
              f"{alone['images/s']:.2f} images/s")
    print(f"forward alone, new / old precision: {forward['images/s'] / old_forward['images/s']:.2f}x "
          "(the most the new default can gain over the old)")
    print(f"new default / old default: {new / old:.2f}x (target 3.5x where bf16 is native; >= 1x without)")
    print(f"served (new default) / forward alone: {new / forward['images/s']:.2f}x (target 0.8x)")
    for row in rows[2:]:
        print(f"{row['server']} / new default: {row['requests/s'] / new:.2f}x")


if __name__ == "__main__":
    main()
