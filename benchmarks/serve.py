"""Serving: memory of many adapters over one base, and requests/s and latency on loopback.

    python benchmarks/serve.py [--requests 32] [--skip-vit-base]

1. Memory: resident memory (VmRSS) of a process holding 1 ViT-Base LoRA adapter, 10 adapters
   over the same base, and 10 full ViT-Base models (config-built, random weights), each
   measured in a fresh process.
2. Throughput: a real ``visionlora serve`` on a loopback port; requests/s and p50/p99 latency
   at concurrency 1, 8 and 32 for a tiny adapter and a ViT-Base adapter, against the same
   server with batching off (--max-batch-size 1) and a naive server that loads the run with
   ``visionlora.load`` (PeftModel.from_pretrained) for every request. Each level sends a fixed
   number of requests, so every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import report, run_isolated, table  # noqa: E402


def make_runs(root: Path, base: str, count: int, image_size: int) -> list[Path]:
    """``count`` LoRA runs (random adapters, no training) over one saved base, in the run layout: ``base`` is
    vit-base, vit-small (6 layers of width 384) or tiny."""
    import torch

    from visionlora.artifacts import RunPaths, atomic_write_json, save_model
    from visionlora.modeling.adapters import apply_adapter
    from visionlora.tasks import get_task
    from visionlora.tasks.classification.builtin import tiny_vit

    task = get_task("classification")
    labels = [f"class{i}" for i in range(10)]
    base_dir = root / "base"
    if base in ("vit-base", "vit-small"):
        from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

        small = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6, "intermediate_size": 1536}
        model = ViTForImageClassification(ViTConfig(num_labels=10, id2label=dict(enumerate(labels)),
                                                     label2id={n: i for i, n in enumerate(labels)},
                                                     **(small if base == "vit-small" else {})))
        processor = ViTImageProcessorPil(size={"height": 224, "width": 224})
    else:
        model, processor = tiny_vit(labels, image_size)
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    runs = []
    for index in range(count):
        torch.manual_seed(index)
        fresh = type(model).from_pretrained(base_dir)
        _, _, info = task.model.build_model(str(base_dir), labels, None, "lora")
        peft_model, _ = apply_adapter(fresh, 16, 32, 0.0, ["query", "value"], task.model.head_modules(fresh))
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)  # a trained adapter is not zero
        paths = RunPaths(root / f"run{index}", "lora")
        save_model(peft_model, processor, info.to_dict(), paths.model_dir)
        atomic_write_json(paths.summary, {"completed": True})
        runs.append(paths.root)
    return runs


def memory_worker(kind: str, root: str) -> None:
    from visionlora.serving.models import ModelStore

    runs = sorted(p for p in Path(root).glob("run*"))
    store = ModelStore("cpu")
    if kind == "1 adapter":
        store.add("m0", runs[0])
    elif kind == "10 adapters":
        for index, run in enumerate(runs[:10]):
            store.add(f"m{index}", run)
    else:  # 10 full models, each its own folder (as 10 fine-tuned models would be)
        for index in range(10):
            store.add(f"m{index}", Path(root) / f"full{index}")
    from PIL import Image

    image = Image.new("RGB", (224, 224), (120, 30, 200))
    for served in store.models.values():  # a forward each: every weight page is touched, as in serving
        served.predict([image])
    rss = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmRSS")).split()[1])
    report({"kind": kind, "models": len(store.models), "bases": len(store.bases), "rss_mb": rss / 1024})


def save_full_run(root: Path) -> None:
    """Ten full-mode ViT-Base run folders."""
    from transformers import ViTForImageClassification

    from visionlora.artifacts import RunPaths, atomic_write_json, save_model
    from visionlora.tasks import get_task

    labels = [f"class{i}" for i in range(10)]
    _, processor, info = get_task("classification").model.build_model(str(root / "base"), labels, None, "full")
    model = ViTForImageClassification.from_pretrained(root / "base")
    for index in range(10):
        paths = RunPaths(root / f"full{index}", "full")
        save_model(model, processor, info.to_dict(), paths.model_dir)
        atomic_write_json(paths.summary, {"completed": True})


def png(size: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def post(url: str, image: bytes) -> float:
    import urllib.request
    import uuid

    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'.encode()
            + image + f"\r\n--{boundary}--\r\n".encode())
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as answer:
        answer.read()
    return time.perf_counter() - started


def load_test(url: str, image: bytes, concurrency: int, requests: int) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        latencies = list(pool.map(lambda _: post(url, image), range(requests)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {"requests/s": requests / wall, "p50 ms": 1000 * statistics.median(latencies),
            "p99 ms": 1000 * latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]}


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(run: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    process, url = start_serve([f"m={run}", *extra])
    return process, f"{url}/v1/models/m/predict"


def start_serve(arguments: list[str]) -> tuple[subprocess.Popen, str]:
    """``visionlora serve ARGUMENTS`` on a free loopback port, once it answers; (process, base URL)."""
    import urllib.request

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "visionlora", "serve", *arguments, "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).read()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def start_naive_server(run: Path) -> tuple[ThreadingHTTPServer, str]:
    """Loads the run (base + PeftModel.from_pretrained) for every request, as a script calling predict would."""
    import visionlora
    from visionlora.data.images import load_rgb

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            start = body.index(b"\r\n\r\n") + 4
            image = load_rgb(body[start : body.rindex(b"\r\n--")])
            answer = json.dumps({"predictions": visionlora.load(run).predict([image])}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def throughput(label: str, run: Path, image: bytes, requests: int, levels=(1, 8, 32)) -> list[dict]:
    rows = []
    for setup in ("visionlora serve", "batching off", "naive (load per request)"):
        if setup == "naive (load per request)":
            server, url = start_naive_server(run)
        else:
            process, url = start_server(run, *(["--max-batch-size", "1"] if setup == "batching off" else []))
        post(url, image)  # warm up
        for concurrency in levels:
            count = requests if setup != "naive (load per request)" else max(4, requests // 4)
            rows.append({"model": label, "server": setup, "concurrency": concurrency, "requests": count,
                         **load_test(url, image, concurrency, count)})
        if setup == "naive (load per request)":
            server.shutdown()
        else:
            process.terminate()
            process.wait(timeout=60)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--skip-vit-base", action="store_true", help="only the tiny adapter (fast)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        memory_worker(args.rest[0], args.rest[1])
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny_runs = make_runs(tmp / "tiny", "tiny", 1, 32)
        rows = throughput("tiny ViT adapter", tiny_runs[0], png(32), args.requests)
        if not args.skip_vit_base:
            vit_runs = make_runs(tmp / "vitb", "vit-base", 10, 224)
            save_full_run(tmp / "vitb")
            memory = [run_isolated(__file__, [kind, str(tmp / "vitb")])
                      for kind in ("1 adapter", "10 adapters", "10 full models")]
            print("resident memory of the served models (ViT-Base, config-built)")
            print(table(memory, ["kind", "models", "bases", "rss_mb"]))
            print(f"10 adapters / 1 adapter: {memory[1]['rss_mb'] / memory[0]['rss_mb']:.3f}   "
                  f"10 full / 1 adapter: {memory[2]['rss_mb'] / memory[0]['rss_mb']:.3f}")
            print()
            rows += throughput("ViT-Base adapter", vit_runs[0], png(224), max(8, args.requests // 2))
    print("requests/s and latency on loopback (one image per request)")
    print(table(rows, ["model", "server", "concurrency", "requests", "requests/s", "p50 ms", "p99 ms"]))


if __name__ == "__main__":
    main()
