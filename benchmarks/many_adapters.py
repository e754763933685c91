"""Many adapters on one server: mixed-adapter batches, runs loaded on demand, memory with a bound.

    python benchmarks/many_adapters.py [--requests 320] [--rounds 3] [--skip-vit-base] [--throughput-only]
                                       [--precision P]

Every figure comes from real ``visionlora serve --runs-dir`` processes on loopback, over LoRA
runs of one saved base (random adapters and heads, no training: speed and memory do not
depend on what the weights learned).

1. Throughput: requests/s at concurrency 32, one image per request, with the traffic on one
   adapter and spread round-robin over 10 and over 100 adapters, with mixed batches on and off
   (--no-mixed-batches), from keep-alive clients (a connection each, as a load balancer or SDK
   keeps) and from clients opening a connection per request. Every adapter is loaded before the
   clock starts; the two servers (mixing on and off) stay up side by side, and each figure is the
   median of --rounds (3) taken in turn. "vs best 1 adapter" divides by the best one-adapter
   figure of the model and client, mixing on or off. The server's CPU time per request (all its
   threads, from /proc) is set against the least one-adapter figure the same way.
2. Memory: resident memory (VmRSS) of the server with 1, 100 and 1,000 runs under --runs-dir and
   --max-loaded-adapters 64, after a request to every run.
3. Cold loads: latency of an adapter's first request (p50/p99) against a warm request, the
   server's own load time (visionlora_adapter_load_seconds, the first 64 loads making adapter
   slots included), a load into a freed slot, and the time to read the adapter file.

A tiny ViT (48 px) shows the batching where it matters on a CPU; a ViT-Base row (224 px,
config-built) shows the same at full size.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import table  # noqa: E402
from serve import make_runs, png, post, start_serve  # noqa: E402

CONCURRENCY = 32


def clone_adapters(run: Path, folder: Path, count: int) -> list[str]:
    """``count`` copies of ``run`` in ``folder``, each with its adapter and head weights moved a little."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(run / "trained_model_lora" / "adapter_model.safetensors")
    names = []
    for index in range(count):
        copy = folder / f"adapter{index:04d}"
        shutil.copytree(run, copy)
        generator = torch.Generator().manual_seed(index)
        save_file({name: tensor + 0.02 * torch.randn(tensor.shape, generator=generator)
                   for name, tensor in tensors.items()}, copy / "trained_model_lora" / "adapter_model.safetensors")
        names.append(copy.name)
    return names


CLIENTS = ("keep-alive", "connection per request")


class Client:
    """Keeps one HTTP connection per thread (as a load balancer or SDK does), so that the server's and
    the client's cost of opening connections stay out of the comparison; or, with ``keep_alive`` off,
    opens one per request (as a plain script does)."""

    def __init__(self, url: str, keep_alive: bool = True):
        self.host, self.port = url.split("//")[1].split(":")
        self.local = threading.local()
        self.keep_alive = keep_alive

    def post(self, path: str, image: bytes) -> None:
        import http.client

        boundary = "visionlora-benchmark"
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'.encode()
                + image + f"\r\n--{boundary}--\r\n".encode())
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        for attempt in range(2):  # a kept connection the server closed while idle is opened again
            if getattr(self.local, "connection", None) is None:
                self.local.connection = http.client.HTTPConnection(self.host, int(self.port), timeout=600)
            try:
                self.local.connection.request("POST", path, body, headers)
                answer = self.local.connection.getresponse()
                answer.read()
                break
            except (ConnectionError, http.client.HTTPException):
                self.local.connection.close()
                self.local.connection = None
                if attempt:
                    raise
        if not self.keep_alive:
            self.local.connection.close()
            self.local.connection = None
        if answer.status != 200:
            raise RuntimeError(f"{path}: HTTP {answer.status}")


def spread_load(url: str, names: list[str], image: bytes, requests: int, keep_alive: bool = True) -> float:
    """requests/s of ``requests`` requests round-robin over ``names`` at concurrency 32."""
    client = Client(url, keep_alive)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        list(pool.map(lambda i: client.post(f"/v1/models/{names[i % len(names)]}/predict", image), range(requests)))
    return requests / (time.perf_counter() - started)


def touch(url: str, names: list[str], image: bytes, concurrency: int = 1) -> list[float]:
    """One request to each of ``names``; their latencies."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda name: post(f"{url}/v1/models/{name}/predict", image), names))


def server_metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=60).read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})?\s+(\S+)$", text, re.M))


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system, all threads) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(process) -> None:
    process.terminate()
    process.wait(timeout=60)


def throughput_rows(label: str, runs_dir: Path, names: list[str], image: bytes, requests: int,
                    spreads=(1, 10, 100), rounds: int = 3, serve_args: tuple[str, ...] = ()) -> list[dict]:
    """Requests/s and the server's CPU time per request of each spread, client and mixing (two servers, one
    with --no-mixed-batches, both up all along), each the median of ``rounds`` measurements taken in turn,
    so that drift in the machine's speed falls on every figure alike."""
    servers = {mixed: start_serve(["--runs-dir", str(runs_dir), "--max-loaded-adapters", "128", *serve_args,
                                   *([] if mixed else ["--no-mixed-batches"])]) for mixed in (True, False)}
    keys = [(mixed, client, spread) for mixed in servers for client in CLIENTS for spread in spreads]
    rates: dict[tuple, list[float]] = {key: [] for key in keys}
    cpu: dict[tuple, list[float]] = {key: [] for key in keys}
    try:
        for _, url in servers.values():
            touch(url, names[: max(spreads)], image, concurrency=4)  # every adapter loaded before the clock starts
        for _ in range(rounds):
            for mixed, client, spread in keys:
                process, url = servers[mixed]
                used = cpu_seconds(process.pid)
                rates[mixed, client, spread].append(spread_load(url, names[:spread], image, requests,
                                                                keep_alive=client == CLIENTS[0]))
                cpu[mixed, client, spread].append((cpu_seconds(process.pid) - used) / requests * 1000)
    finally:
        for process, _ in servers.values():
            stop(process)
    rows = [{"model": label, "client": client, "adapters": spread, "mixed batches": "on" if mixed else "off",
             "requests": f"{rounds}x{requests}", "requests/s": statistics.median(rates[mixed, client, spread]),
             "server CPU ms/request": statistics.median(cpu[mixed, client, spread])}
            for mixed, client, spread in keys]
    return with_ratios(rows)


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's requests/s, and its server CPU time per request, against the best one-adapter figure of its
    model and client, mixing on or off (above 1: better than it)."""
    for row in rows:
        ones = [other for other in rows if other["adapters"] == 1
                and (other["model"], other["client"]) == (row["model"], row["client"])]
        row["vs best 1 adapter"] = row["requests/s"] / max(other["requests/s"] for other in ones)
        least_cpu = min(other["server CPU ms/request"] for other in ones)
        row["CPU vs best 1 adapter"] = least_cpu / row["server CPU ms/request"]
    return sorted(rows, key=lambda row: (row["model"], row["client"] != CLIENTS[0], row["mixed batches"] == "off",
                                         row["adapters"]))


def memory_rows(label: str, run: Path, root: Path, image: bytes, counts=(1, 100, 1000)) -> tuple[list[dict], dict]:
    rows, cold = [], {}
    for count in counts:
        folder = root / f"memory{count}"
        folder.mkdir()
        names = clone_adapters(run, folder, count)
        process, url = start_serve(["--runs-dir", str(folder), "--max-loaded-adapters", "64"])
        try:
            first = touch(url, names, image)  # each run's first request: a cold load (and evictions past 64)
            warm = touch(url, names[-8:], image)
            rows.append({"model": label, "runs": count, "max loaded": 64,
                         "loaded": server_metric(url, "visionlora_loaded_adapters"),
                         "evictions": server_metric(url, "visionlora_adapter_evictions_total"),
                         "rss MB": rss_mb(process.pid)})
            if count == max(counts):
                loads = server_metric(url, "visionlora_adapter_load_seconds_sum") / server_metric(
                    url, "visionlora_adapter_load_seconds_count")
                cold = cold_row(label, run, first, warm, loads)
        finally:
            stop(process)
        shutil.rmtree(folder)
    base = rows[0]["rss MB"]
    for row in rows:
        row["vs 1 run"] = row["rss MB"] / base
    return rows, cold


def reused_slot_load(run: Path, folder: Path, count: int = 24) -> list[float]:
    """Seconds of each load into a freed adapter slot (in this process, a store holding 4 runs)."""
    from visionlora.serving.models import ModelStore

    folder.mkdir()
    names = clone_adapters(run, folder, count)
    store = ModelStore("cpu", folder, max_loaded=4)
    for name in names[:6]:  # makes the slots
        store.release(store.load(name))
    seconds = []
    for name in names[6:]:
        started = time.perf_counter()
        store.release(store.load(name))
        seconds.append(time.perf_counter() - started)
    shutil.rmtree(folder)
    return seconds


def cold_row(label: str, run: Path, first: list[float], warm: list[float], mean_load: float) -> dict:
    from safetensors.torch import load_file

    weights = run / "trained_model_lora" / "adapter_model.safetensors"
    started = time.perf_counter()
    for _ in range(10):
        load_file(weights)
    read = (time.perf_counter() - started) / 10
    first = sorted(first)
    return {"model": label, "adapter KB": weights.stat().st_size / 1024,
            "first request p50 ms": 1000 * statistics.median(first),
            "first request p99 ms": 1000 * first[min(len(first) - 1, round(0.99 * (len(first) - 1)))],
            "warm request p50 ms": 1000 * statistics.median(warm), "server load mean ms": 1000 * mean_load,
            "load into a freed slot p50 ms": 1000 * statistics.median(reused_slot_load(run, run.parent / "reuse")),
            "read adapter file ms": 1000 * read}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=320, help="requests per throughput row (tiny ViT)")
    parser.add_argument("--skip-vit-base", action="store_true", help="only the tiny ViT (fast)")
    parser.add_argument("--throughput-only", action="store_true", help="only the throughput table")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each tiny ViT figure")
    parser.add_argument("--vit-base-rounds", type=int, default=3, help="rounds of each ViT-Base figure")
    parser.add_argument("--precision", help="the servers' --precision (default: serve's own)")
    args = parser.parse_args()
    serve_args = ("--precision", args.precision) if args.precision else ()
    memory, colds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny = make_runs(tmp / "tiny", "tiny", 1, 48)[0]
        (tmp / "tiny" / "runs").mkdir()
        names = clone_adapters(tiny, tmp / "tiny" / "runs", 100)
        image = png(48)
        throughput = throughput_rows("tiny ViT 48px", tmp / "tiny" / "runs", names, image, args.requests,
                                     rounds=args.rounds, serve_args=serve_args)
        if not args.throughput_only:
            memory, cold = memory_rows("tiny ViT 48px", tiny, tmp / "tiny", image)
            colds.append(cold)
        if not args.skip_vit_base:
            vit = make_runs(tmp / "vitb", "vit-base", 1, 224)[0]
            (tmp / "vitb" / "runs").mkdir()
            vit_names = clone_adapters(vit, tmp / "vitb" / "runs", 100)
            throughput += throughput_rows("ViT-Base 224px", tmp / "vitb" / "runs", vit_names, png(224),
                                          max(32, args.requests // 5), rounds=args.vit_base_rounds,
                                          serve_args=serve_args)
            if not args.throughput_only:
                vit_memory, vit_cold = memory_rows("ViT-Base 224px", vit, tmp / "vitb", png(224), counts=(1, 100))
                memory += vit_memory
                colds.append(vit_cold)
    print(f"requests/s at concurrency {CONCURRENCY}, one image per request, spread round-robin over the adapters")
    print(table(throughput, ["model", "client", "adapters", "mixed batches", "requests", "requests/s",
                             "vs best 1 adapter", "server CPU ms/request", "CPU vs best 1 adapter"]))
    if args.throughput_only:
        return
    print()
    print("resident memory of the server after a request to every run under --runs-dir")
    print(table(memory, ["model", "runs", "max loaded", "loaded", "evictions", "rss MB", "vs 1 run"]))
    print()
    print("an adapter's first request (a cold load) against a warm one")
    print(table(colds, ["model", "adapter KB", "first request p50 ms", "first request p99 ms", "warm request p50 ms",
                        "server load mean ms", "load into a freed slot p50 ms", "read adapter file ms"]))


if __name__ == "__main__":
    main()
