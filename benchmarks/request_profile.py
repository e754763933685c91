"""What one request costs, from socket to answer: each step's time against the forward's.

    python benchmarks/request_profile.py [--skip-vit-base] [--image-size 480] [--requests 160]

For a tiny ViT (48 px) and a config-built ViT-Base (224 px), one LoRA run each, with a PNG of
``--image-size`` px:

1. Steps, in this process, each the median of many calls on one image: reading the multipart body,
   decoding the image, resizing and normalising it (as the server's request path does: what
   ``visionlora predict`` does, on the same pixels), the forward at batch 1 and per image at
   ``--batch`` images, turning the logits into the answer and the answer into JSON.
2. Mixing: one batch of ``--batch`` images through the server's forward (``predict_together``, inputs
   prepared ahead as the server prepares them) with every row on the active adapter (the plain
   forward), on one adapter that is not the active one, and spread over 2, 10 and 16 adapters.
3. The served rate: a real ``visionlora serve`` on loopback, ``--batch`` keep-alive clients, against the
   forward alone at that batch size (images/s): the part of the forward's rate the server keeps.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import table  # noqa: E402
from many_adapters import Client, clone_adapters  # noqa: E402
from serve import make_runs, png, start_serve  # noqa: E402

BOUNDARY = "visionlora-profile"


def multipart(image: bytes) -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'.encode()
            + image + f"\r\n--{BOUNDARY}--\r\n".encode())


def median_ms(step: Callable[[], Any], repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def form_parser(body: bytes) -> Callable[[], bytes]:
    """Reading ``body`` as the server does (Starlette's multipart parser, 64 KiB chunks), on one event loop."""
    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartParser

    loop = asyncio.new_event_loop()
    headers = Headers({"content-type": f"multipart/form-data; boundary={BOUNDARY}", "content-length": str(len(body))})

    async def stream():
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    async def parse():
        form = await MultiPartParser(headers, stream(), max_part_size=len(body) + 1).parse()
        return await form.getlist("file")[0].read()

    return lambda: loop.run_until_complete(parse())


def step_rows(label: str, run: Path, image: bytes, batch: int) -> list[dict]:
    """Each step of one request, in ms per image."""
    import torch
    from fastapi.responses import JSONResponse

    from visionlora.data.images import load_rgb
    from visionlora.deploy.prediction import prepared_inputs
    from visionlora.serving.models import ModelStore

    store = ModelStore("cpu")
    served = store.add("m", str(run))
    body = multipart(image)
    task, model = served.task, served.base.model
    options = task.prediction.default_options()
    decoded = load_rgb(image)

    def resized():
        return prepared_inputs(task, [decoded], [served.view])

    model.eval()
    pixels = torch.stack([resized()[0][0].pixel_values] * batch)
    forward_kwargs = served.info.forward_kwargs

    def forward(rows: int) -> Callable[[], Any]:
        def run_forward():
            with torch.inference_mode():
                return model(pixel_values=pixels[:rows], **forward_kwargs)
        return run_forward

    outputs = forward(1)()
    answer = task.prediction.decode(outputs, [None], [None], served.processor, served.info, options)
    steps = [("read the multipart body", form_parser(body), 1),
             ("decode the image", lambda: load_rgb(image), 1),
             ("resize + normalise", resized, 1),
             ("forward, batch 1", forward(1), 1),
             (f"forward, batch {batch}, per image", forward(batch), batch),
             ("logits to answer", lambda: task.prediction.decode(outputs, [None], [None], served.processor,
                                                                 served.info, options), 1),
             ("answer to JSON", lambda: JSONResponse({"predictions": [{"image": "a.png", **answer[0]}]}).body, 1)]
    repeats = 20 if "Base" in label else 100
    rows = [{"model": label, "step": name, "ms per image": median_ms(step, repeats) / per}
            for name, step, per in steps]
    forward_ms = rows[4]["ms per image"]
    for row in rows:
        row["vs forward"] = row["ms per image"] / forward_ms
    return rows


def served_row(label: str, run: Path, image: bytes, batch: int, requests: int, forward_ms: float) -> dict:
    process, url = start_serve([f"m={run}", "--max-batch-size", str(batch)])
    try:
        client = Client(url)
        with ThreadPoolExecutor(max_workers=batch) as pool:
            list(pool.map(lambda _: client.post("/v1/models/m/predict", image), range(2 * batch)))  # warm
            started = time.perf_counter()
            list(pool.map(lambda _: client.post("/v1/models/m/predict", image), range(requests)))
            rate = requests / (time.perf_counter() - started)
    finally:
        process.terminate()
        process.wait(timeout=60)
    forward_rate = 1000 / forward_ms
    return {"model": label, "clients": batch, "served requests/s": rate,
            f"forward alone, batch {batch}, images/s": forward_rate, "served / forward": rate / forward_rate}


def mixing_rows(label: str, runs_dir: Path, names: list[str], image: bytes, batch: int) -> list[dict]:
    """ms of one batch's forward (inputs prepared ahead) by how its rows spread over adapters."""
    from visionlora.data.images import load_rgb
    from visionlora.deploy.prediction import prepared_inputs
    from visionlora.serving.models import ModelStore, predict_together

    store = ModelStore("cpu", runs_dir, max_loaded=128)
    served = [store.load(name) for name in names]
    images = [load_rgb(image)] * batch
    prepared = prepared_inputs(served[0].task, images, [served[0].view] * batch)
    repeats = 10 if "Base" in label else 60

    def batch_ms(members: list, active: str) -> float:
        served[0].base.model.set_adapter(active)  # a mixed forward leaves the active adapter as it is
        return median_ms(lambda: predict_together(members, images, prepared=prepared), repeats)

    cases = [("1 adapter, the active one (plain forward)", [served[0]] * batch, served[0].adapter),
             ("1 adapter, not the active one", [served[0]] * batch, served[1].adapter)]
    cases += [(f"{spread} adapters, round-robin", [served[i % spread] for i in range(batch)], served[0].adapter)
              for spread in (2, 10, 16) if spread <= len(served)]
    rows = [{"model": label, "batch": f"{batch} images", "rows": case, "ms per batch": batch_ms(members, active)}
            for case, members, active in cases]
    for row in rows:
        row["vs plain"] = row["ms per batch"] / rows[0]["ms per batch"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-size", type=int, default=480, help="side of the uploaded PNG")
    parser.add_argument("--batch", type=int, default=16, help="clients, the server's --max-batch-size")
    parser.add_argument("--requests", type=int, default=320, help="requests for the served rate (tiny ViT)")
    parser.add_argument("--skip-vit-base", action="store_true", help="only the tiny ViT (fast)")
    args = parser.parse_args()
    image = png(args.image_size)
    steps, mixing, served = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        models = [("tiny ViT 48px", "tiny", 48, args.requests)]
        if not args.skip_vit_base:
            models.append(("ViT-Base 224px", "vit-base", 224, max(32, args.requests // 10)))
        for label, base, size, requests in models:
            run = make_runs(Path(tmp) / base, base, 1, size)[0]
            rows = step_rows(label, run, image, args.batch)
            steps += rows
            (Path(tmp) / base / "runs").mkdir()
            names = clone_adapters(run, Path(tmp) / base / "runs", 16)
            mixing += mixing_rows(label, Path(tmp) / base / "runs", names, image, args.batch)
            served.append(served_row(label, run, image, args.batch, requests, rows[4]["ms per image"]))
    print(f"one request's steps, a {args.image_size} px PNG, ms per image (median)")
    print(table(steps, ["model", "step", "ms per image", "vs forward"]))
    print()
    print("one batch's forward (inputs prepared ahead) by how its rows spread over adapters (median)")
    print(table(mixing, ["model", "batch", "rows", "ms per batch", "vs plain"]))
    print()
    print(f"served requests/s at {args.batch} keep-alive clients against the forward alone")
    print(table(served, list(served[0])))


if __name__ == "__main__":
    main()
