"""Ray on one machine: what Ray Data batch prediction and the Ray Serve deployment cost against
``visionlora predict`` and ``visionlora serve``.

    python benchmarks/ray_scale.py [--images 3000] [--requests 320] [--skip-vit-base]

A Ray head is started on loopback first (``ray start --head``, as on a cluster), so each Ray
figure includes connecting, starting the actors or replicas and stopping, but not starting Ray.

1. Batch prediction: images/s of ``visionlora predict RUN FOLDER --output x.jsonl`` (one process,
   torch on every core) against ``--engine ray`` with 1 actor of 2 CPUs and 2 actors of 1 CPU (an
   actor's CPUs are its torch threads), over generated 320x240 JPEG files. Each figure is
   the wall time of the whole command; the median of 2 rounds taken in turn.
2. Serving: requests/s at concurrency 32 (keep-alive connections, one image per request) of
   ``visionlora serve --runs-dir`` against ``visionlora serve --ray`` with 1 replica of 2 CPUs and
   2 replicas of 1 CPU, the requests spread over 4 adapters of one base; the median of 3 rounds.
   Beside them, Ray Serve's own ceiling on this machine: deployments that only echo, one hop
   (proxy to replica) and two (proxy to gateway to replica, as ``serve --ray``).

On 2 cores this shows Ray's overhead, not its scaling: one process already uses both cores, and
actors, replicas, Ray's own processes and the client share them. On a cluster each node added
brings its actors or replicas, and the images/s and requests/s grow with the nodes.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import table  # noqa: E402
from many_adapters import CONCURRENCY, Client, clone_adapters, spread_load, stop  # noqa: E402
from serve import free_port, make_runs, png, start_serve  # noqa: E402

ADAPTERS = 4
RAY = str(Path(sys.executable).with_name("ray"))  # the command beside this Python, venv or not
RAY_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                   "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def write_images(folder: Path, count: int) -> Path:
    """``count`` 320x240 JPEG files: smooth colour fields with a disc, so that they compress as photos do."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:240, 0:320]
    for index in range(count):
        a, b, c = rng.uniform(0, 1, 3)
        pixels = np.stack([128 + 100 * np.sin(x / (20 + 40 * a)), 128 + 100 * np.cos(y / (20 + 40 * b)),
                           np.full_like(x, 255 * c, dtype=float)], axis=-1).astype(np.uint8)
        image = Image.fromarray(pixels)
        cx, cy, r = rng.integers(40, 280), rng.integers(40, 200), rng.integers(10, 40)
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        image.save(folder / f"{index:05d}.jpg", quality=90)
    return folder


def start_head(cpus: int, sessions: Path) -> tuple[subprocess.Popen, str]:
    """A Ray head on loopback with ``cpus`` CPUs; (process, address) once it answers."""
    port = free_port()
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port",
                             str(port), "--num-cpus", str(cpus), "--include-dashboard", "false",
                             "--disable-usage-stats", "--temp-dir", str(sessions)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, **RAY_ENVIRONMENT})
    address = f"127.0.0.1:{port}"
    for _ in range(120):
        if subprocess.run([RAY, "status", "--address", address], capture_output=True).returncode == 0:
            return head, address
        time.sleep(1)
    raise RuntimeError("the Ray head did not start")


def stop_head(head: subprocess.Popen) -> None:
    head.terminate()
    try:
        head.wait(timeout=60)
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def predict_seconds(run: Path, images: Path, output: Path, *extra: str) -> float:
    """Wall time of one ``visionlora predict`` command writing a fresh ``output``."""
    output.unlink(missing_ok=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "visionlora", "predict", str(run), str(images), "--output", str(output),
                    *extra], check=True, capture_output=True, env={**os.environ, **RAY_ENVIRONMENT})
    return time.perf_counter() - started


def batch_rows(label: str, run: Path, images: Path, count: int, address: str, tmp: Path, rounds: int = 2) -> list:
    ray = ["--engine", "ray", "--ray-address", address]
    engines = {"local predict": [],
               "ray, 1 actor x 2 CPUs": [*ray, "--actors", "1", "--cpus-per-actor", "2"],
               "ray, 2 actors x 1 CPU": [*ray, "--actors", "2", "--cpus-per-actor", "1"]}
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, extra in engines.items():
            seconds[name].append(predict_seconds(run, images, tmp / "out.jsonl", *extra))
    local = count / statistics.median(seconds["local predict"])
    rows = []
    for name in engines:
        rate = count / statistics.median(seconds[name])
        rows.append({"model": label, "engine": name, "images": f"{rounds}x{count}",
                     "seconds": statistics.median(seconds[name]), "images/s": rate, "vs local predict": rate / local})
    return rows


def serve_rows(label: str, run: Path, image: bytes, requests: int, address: str, rounds: int = 3) -> list:
    """Requests spread round-robin over 4 adapters of one base, which Ray routes to the replicas holding them."""
    runs_dir = run.parent / "adapters"
    runs_dir.mkdir()
    names = clone_adapters(run, runs_dir, ADAPTERS)
    ray = ["--ray", "--ray-address", address]
    servers = {"visionlora serve": [],
               "serve --ray, 1 replica x 2 CPUs": [*ray, "--replicas", "1", "--replica-cpus", "2"],
               "serve --ray, 2 replicas x 1 CPU": [*ray, "--replicas", "2", "--replica-cpus", "1"]}
    rows, single = [], None
    for name, extra in servers.items():
        process, url = start_serve(["--runs-dir", str(runs_dir), *extra])
        try:
            spread_load(url, names, image, 4 * CONCURRENCY)  # every adapter loaded where it is routed
            rate = statistics.median(spread_load(url, names, image, requests) for _ in range(rounds))
        finally:
            stop(process)
        single = single or rate
        rows.append({"model": label, "server": name, "requests": f"{rounds}x{requests}", "requests/s": rate,
                     "vs visionlora serve": rate / single})
    return rows


def ray_serve_ceiling(address: str, requests: int, rounds: int = 3) -> list:
    """requests/s of Ray Serve deployments that do no work (an echo of the first bytes), one hop (the
    proxy to a replica) and two (the proxy to a gateway to a replica, the shape of serve --ray)."""
    import ray
    from ray import serve
    from starlette.responses import Response

    @serve.deployment(max_ongoing_requests=64)
    class Echo:
        async def __call__(self, request):
            return Response((await request.body())[:10])

        async def handle(self, body: bytes) -> bytes:
            return body[:10]

    @serve.deployment(max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0})
    class Forward:
        def __init__(self, echo):
            self.echo = echo

        async def __call__(self, request):
            return Response(await self.echo.handle.remote(await request.body()))

    port = free_port()
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, application in (("Ray Serve echo, 1 hop", Echo.bind()),
                                  ("Ray Serve echo, 2 hops", Forward.bind(Echo.bind()))):
            serve.run(application, name="echo", route_prefix="/")
            client = Client(f"http://127.0.0.1:{port}")
            _timed_posts(client, requests)
            rate = statistics.median(_timed_posts(client, requests) for _ in range(rounds))
            rows.append({"model": "none", "server": name, "requests": f"{rounds}x{requests}", "requests/s": rate})
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def _timed_posts(client: Client, requests: int) -> float:
    image = png(48)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        list(pool.map(lambda _: client.post("/", image), range(requests)))
    return requests / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=3000, help="generated images for the batch rows (tiny ViT)")
    parser.add_argument("--requests", type=int, default=320, help="requests per serving round (tiny ViT)")
    parser.add_argument("--skip-vit-base", action="store_true", help="only the tiny ViT (fast)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vlray-") as tmp:
        tmp = Path(tmp)
        # 2 CPUs of actors and decoding (0.5) at once; Ray's CPUs are places to run, not cores
        head, address = start_head(max(os.cpu_count() or 1, math.ceil(2 + 0.5)), tmp / "ray")
        try:
            tiny = make_runs(tmp / "tiny", "tiny", 1, 48)[0]
            images = write_images(tmp / "images", args.images)
            batch = batch_rows("tiny ViT 48px", tiny, images, args.images, address, tmp)
            serving = serve_rows("tiny ViT 48px", tiny, png(48), args.requests, address)
            serving += ray_serve_ceiling(address, args.requests)
            if not args.skip_vit_base:
                vit = make_runs(tmp / "vitb", "vit-base", 1, 224)[0]
                few = args.images // 10
                subset = write_images(tmp / "few", few)
                batch += batch_rows("ViT-Base 224px", vit, subset, few, address, tmp, rounds=1)
                serving += serve_rows("ViT-Base 224px", vit, png(224), max(32, args.requests // 5),
                                      address, rounds=1)
        finally:
            stop_head(head)
    print(f"batch prediction over generated 320x240 JPEG files ({os.cpu_count()} cores; a Ray head already running)")
    print(table(batch, ["model", "engine", "images", "seconds", "images/s", "vs local predict"]))
    print()
    print(f"serving at concurrency {CONCURRENCY}, one image per request, keep-alive connections")
    print(table(serving, ["model", "server", "requests", "requests/s", "vs visionlora serve"]))


if __name__ == "__main__":
    main()
