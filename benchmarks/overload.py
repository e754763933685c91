"""Overload and faults: a real ``visionlora serve`` offered 4x its capacity, hostile images mixed in.

    python benchmarks/overload.py [--model vit-small|vit-base|tiny] [--requests 240] [--factor 4]

1. Capacity: requests/s of a closed loop (as many clients as a batch holds) against the server,
   started with ``--max-queue`` and ``--timeout-s``.
2. The burst: a fixed count of requests offered open-loop at ``factor`` x that rate (each sent at
   its time, whatever the server answers), one in ten a hostile body (a PNG whose header claims
   50,000 x 50,000 pixels, a truncated PNG, text, an empty body, a text/plain body). Every good
   request must be answered 200, 503 (queue full) or 504 (past the deadline); every hostile one
   its 4xx, or the 503 of a full queue (refused before its body is read); the server's resident
   memory is sampled throughout.
3. Recovery: the closed loop again, once the burst is answered; its requests/s against capacity.

The table gives each phase's answers by status, the requests/s answered 200 (against capacity),
the p50/p99 latency of the 200 answers (against the deadline), the peak resident memory
(against the server at rest after warm-up) and the refusals the server counted in
``/metrics``. Loops are bounded in count and time.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import struct
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import table  # noqa: E402
from serve import make_runs, png, start_serve  # noqa: E402

HOSTILE_EVERY = 10


def claiming_png(width: int, height: int) -> bytes:
    """A PNG of a hundred bytes whose header claims ``width`` x ``height`` greyscale pixels (its data
    holds a few rows): what a decoder would allocate for, were the header believed."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def hostile_bodies() -> list[tuple[str, bytes, str]]:
    """(name, body, content type) of each hostile request."""
    good = png(224)
    return [("pixel bomb", claiming_png(50_000, 50_000), "image/png"),
            ("truncated", good[: len(good) // 2], "image/png"),
            ("not an image", b"plain text, not pixels", "image/png"), ("empty", b"", "image/png"),
            ("wrong type", good, "text/plain")]


def send(url: str, body: bytes, content_type: str, timeout: float = 120) -> tuple[int, float]:
    """(status, seconds) of one POST of ``body``; a refused connection is status 0."""
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read()
            status = answer.status
    except urllib.error.HTTPError as err:
        err.read()
        status = err.code
    except OSError:
        status = 0
    return status, time.perf_counter() - started


def closed_loop(url: str, image: bytes, clients: int, requests: int) -> list[tuple[str, int, float]]:
    """(kind, status, seconds) of ``requests`` good ones sent by ``clients`` clients, each sending when answered."""
    with ThreadPoolExecutor(max_workers=clients) as pool:
        return [("good", *answer) for answer in pool.map(lambda _: send(url, image, "image/png"), range(requests))]


def open_loop(url: str, image: bytes, rate: float, requests: int,
              hostile: list[tuple[str, bytes, str]]) -> list[tuple[str, int, float]]:
    """``requests`` sent at ``rate`` per second whatever the answers, one in HOSTILE_EVERY ``hostile``:
    (kind, status, seconds) each."""
    started = time.perf_counter()

    def one(index: int) -> tuple[str, int, float]:
        time.sleep(max(0.0, started + index / rate - time.perf_counter()))
        if index % HOSTILE_EVERY == HOSTILE_EVERY - 1:
            name, body, content_type = hostile[(index // HOSTILE_EVERY) % len(hostile)]
            return (name, *send(url, body, content_type))
        return ("good", *send(url, image, "image/png"))

    with ThreadPoolExecutor(max_workers=256) as pool:
        return list(pool.map(one, range(requests)))


class MemoryWatch:
    """The peak resident memory of process ``pid``, sampled every 50 ms while in use."""

    def __init__(self, pid: int):
        self.pid, self.peak_mb, self.done = pid, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.done.wait(0.05):
            self.peak_mb = max(self.peak_mb, rss_mb(self.pid))

    def __enter__(self) -> MemoryWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def refusals(base: str) -> dict[str, float]:
    """The server's refusals by cause, and the images it dropped before their forward."""
    text = urllib.request.urlopen(f"{base}/metrics", timeout=60).read().decode()
    counted = {cause: float(value) for cause, value in
               re.findall(r'^visionlora_refusals_total\{cause="(\w+)"\} (\S+)$', text, re.M)}
    dropped = re.search(r"^visionlora_dropped_images_total (\S+)$", text, re.M)
    return {**counted, "dropped images": float(dropped.group(1)) if dropped else 0.0}


def row(phase: str, answers: list[tuple[str, int, float]], seconds: float, deadline: float, peak: float,
        rest: float) -> dict:
    good = [(status, latency) for kind, status, latency in answers if kind == "good"]
    bad = [status for kind, status, _ in answers if kind != "good"]
    served = [latency for status, latency in good if status == 200]
    statuses = Counter(status for status, _ in good)
    p99 = percentile(served, 0.99)
    return {"phase": phase, "requests": len(answers), "requests/s offered": round(len(answers) / seconds, 1),
            "requests/s served": round(len(served) / seconds, 2),
            "200": statuses[200], "503": statuses[503], "504": statuses[504],
            "other (good)": sum(n for s, n in statuses.items() if s not in (200, 503, 504)),
            "hostile 4xx": sum(400 <= s < 500 for s in bad), "hostile 503": bad.count(503),
            "hostile other": sum(not (400 <= s < 500 or s == 503) for s in bad),
            "p50 ms (200)": 1000 * statistics.median(served) if served else None,
            "p99 ms (200)": 1000 * p99 if p99 is not None else None,
            "p99 < deadline": p99 is not None and p99 < deadline,
            "peak rss MB": round(peak, 1), "vs at rest": round(peak / rest, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("vit-small", "vit-base", "tiny"), default="vit-small",
                        help="vit-small: 6 layers of width 384 at 224px, a forward well within the deadline on 2 "
                             "cores; tiny: the client, not the server, is the bottleneck")
    parser.add_argument("--requests", type=int, default=240, help="requests in the burst")
    parser.add_argument("--factor", type=float, default=4.0, help="the burst's rate, times the capacity")
    parser.add_argument("--batch", type=int, default=8, help="--max-batch-size (and the closed loop's clients)")
    parser.add_argument("--max-queue", type=int, default=16, help="--max-queue (two batches)")
    parser.add_argument("--timeout-s", type=float, default=5.0)
    args = parser.parse_args()
    size = 48 if args.model == "tiny" else 224
    with tempfile.TemporaryDirectory() as folder:
        run = make_runs(Path(folder), args.model, 1, size)[0]
        process, base = start_serve([f"m={run}", "--max-batch-size", str(args.batch), "--max-wait-ms", "10",
                                     "--max-queue", str(args.max_queue), "--timeout-s", str(args.timeout_s)])
        url, image, hostile = f"{base}/v1/models/m/predict", png(size), hostile_bodies()
        try:
            closed_loop(url, image, args.batch, 6 * args.batch)  # warm-up: the capacity is measured warm
            rest = rss_mb(process.pid)
            capacity, rows = 0.0, []
            for phase in ("capacity", "burst", "after the burst"):
                with MemoryWatch(process.pid) as watch:
                    started = time.perf_counter()
                    if phase == "burst":
                        answers = open_loop(url, image, args.factor * capacity, args.requests, hostile)
                    else:
                        answers = closed_loop(url, image, args.batch, 6 * args.batch)
                    seconds = time.perf_counter() - started
                rows.append(row(phase, answers, seconds, args.timeout_s, watch.peak_mb, rest))
                capacity = capacity or rows[-1]["requests/s served"]  # the 200 answers/s of the first closed loop
                rows[-1]["vs capacity"] = round(rows[-1]["requests/s served"] / capacity, 3)
                if phase != "burst":
                    rows[-1]["requests/s offered"] = None
            counted = refusals(base)
        finally:
            process.terminate()
            process.wait(timeout=60)
    print(f"visionlora serve, {args.model} LoRA ({size}px), --max-batch-size {args.batch} --max-queue "
          f"{args.max_queue} --timeout-s {args.timeout_s:g}; burst: {args.requests} requests at {args.factor:g}x "
          f"capacity, 1 in {HOSTILE_EVERY} hostile; at rest {rest:.1f} MB; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs at the end")
    print(table(rows, ["phase", "requests", "requests/s offered", "requests/s served", "vs capacity", "200", "503",
                       "504", "other (good)", "hostile 4xx", "hostile 503", "hostile other", "p50 ms (200)",
                       "p99 ms (200)", "p99 < deadline", "peak rss MB", "vs at rest"]))
    print("counted by the server (/metrics): "
          + ", ".join(f"{cause} {value:g}" for cause, value in sorted(counted.items())))


if __name__ == "__main__":
    main()
