"""Every device path of visionlora on a GPU, in one run of a few minutes, as one table.

    python benchmarks/gpu_check.py              # on the GPU (CUDA, else MPS): ViT-B from config, bf16 where native
    python benchmarks/gpu_check.py --dry-run    # the same steps on the CPU with tiny models (under a minute)

Steps, each timed (with the device synchronised) and checked:

1. ``train``: a default LoRA run (the preset's r, alpha and targets; ``--mixed-precision auto``)
   of a few steps through to its run folder, base ViT-B/16 built from its config;
2. ``resume``: a run stopped after its first checkpoint, resumed with ``--resume`` to the end;
3. ``predict`` and ``evaluate``: the finished run loaded with ``visionlora.load``;
4. ``serve``: two adapters over one base behind the real server, concurrent requests, answered
   in mixed-adapter batches (counted from ``/metrics``);
5. ``onnx``: the run exported to ONNX and predicted in onnxruntime, with the providers it ran on;
6. ``packed``: ``train-many`` of 8 jobs (2 in the dry run) at the run's batch size (16), packed, against
   the same jobs one after another: step images/s of each, and the packed steps' model FLOP utilisation;
7. ``throughput``: images/s of LoRA training steps at batch 32, and the model FLOP utilisation
   (FLOPs of one step counted by ``torch.utils.flop_counter``) against the card's dense bf16 peak.

The exit status is 1 when any step failed; each failure is one line in the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_device, synchronize, table  # noqa: E402

# dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets
DENSE_BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
                    "RTX 4090": 165e12, "RTX 3090": 71e12}


class Plan:
    """What the run uses: the device, the base model, the data size and how long to train."""

    def __init__(self, dry_run: bool, work: Path):
        self.dry_run, self.work = dry_run, work
        self.device = "cpu" if dry_run else bench_device()
        self.images_per_class = 8 if dry_run else 64
        self.max_steps = 4 if dry_run else 12
        self.batch_size = 8 if dry_run else 16
        self.throughput_batch = 8 if dry_run else 32
        self.packed_jobs = 2 if dry_run else 8
        self.model = "tiny" if dry_run else str(vit_base_folder(work / "vit-base"))
        self.data = work / "data"


def vit_base_folder(folder: Path) -> Path:
    """ViT-B/16 at 224 built from its config (random weights: no hub here), saved as a checkpoint."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    ViTForImageClassification(ViTConfig(num_labels=4)).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def settings(plan: Plan, output: Path, **overrides: Any):
    from visionlora.config import TrainConfig

    values: dict[str, Any] = dict(task="classification", data=str(plan.data), model=plan.model, epochs=2,
                                  batch_size=plan.batch_size, max_steps=plan.max_steps, output=str(output),
                                  overwrite=True, progress=False, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def step_train(plan: Plan) -> dict[str, Any]:
    from visionlora.training.engine import train

    result = train(settings(plan, plan.work / "runs" / "ants"))
    summary = result.summary or {}
    return {"precision": summary.get("mixed_precision"), "device": str(next(result.model.parameters()).device),
            "trainable %": round(summary["parameters"]["trainable_percent"], 2),
            summary["main_metric"]: round(summary["metrics"][summary["main_metric"]], 4)}


def step_resume(plan: Plan) -> dict[str, Any]:
    """A run stopped at its fifth batch (after a checkpoint at step 2), then resumed to the end."""
    from visionlora.tasks.classification.task import ClassificationSteps
    from visionlora.training.engine import resume, train

    original, calls = ClassificationSteps.loss, {"n": 0}

    def stop_at_fifth(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    run = plan.work / "runs" / "resumed"
    ClassificationSteps.loss = stop_at_fifth  # type: ignore[method-assign]
    try:
        train(settings(plan, run, save_every=2, max_steps=None, epochs=2))
    except KeyboardInterrupt:
        pass
    finally:
        ClassificationSteps.loss = original  # type: ignore[method-assign]
    summary = resume(run).summary or {}
    return {"stopped at batch": 5, "resumed epochs": summary["training"]["epochs_run"]}


def step_predict_and_evaluate(plan: Plan) -> dict[str, Any]:
    import visionlora

    run = visionlora.load(plan.work / "runs" / "ants", device=plan.device)
    images = sorted((plan.data / "val").rglob("*.png"))[:8]
    predictions = run.predict(images)
    metrics = run.evaluate()["metrics"]
    return {"predicted": len(predictions), "accuracy": round(metrics["accuracy"], 4),
            "device": str(run.model.device)}


def step_serve(plan: Plan) -> dict[str, Any]:
    """Two adapters of one base behind the real app; 32 concurrent requests spread over both."""
    from fastapi.testclient import TestClient

    from visionlora.serving.app import ServeSettings, create_app
    from visionlora.serving.models import ModelStore
    from visionlora.training.engine import train

    train(settings(plan, plan.work / "runs" / "bees", lr=4e-4))  # the same base (and seed), another adapter
    store = ModelStore(device=plan.device, runs_dir=plan.work / "runs")
    app = create_app(store, ServeSettings(max_batch_size=16, max_wait_ms=20.0, precision="fp32"))
    image = sorted((plan.data / "val").rglob("*.png"))[0].read_bytes()
    names = ["ants", "bees"] * 16
    with TestClient(app) as client:
        client.post("/v1/models/ants/predict", files={"file": ("a.png", image, "image/png")})  # loads, warms up

        def ask(name: str) -> int:
            return client.post(f"/v1/models/{name}/predict", files={"file": ("a.png", image, "image/png")}).status_code

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(ask, names))
        seconds = time.perf_counter() - started
        metrics = client.get("/metrics").text
    if set(statuses) != {200}:
        raise RuntimeError(f"answers other than 200: {sorted(set(statuses))}")
    mixed = _metric_sum(metrics, "visionlora_forward_images_count", lambda labels: 'adapters="1"' not in labels)
    if not mixed:
        raise RuntimeError("no forward mixed the two adapters")
    return {"requests": len(names), "requests/s": round(len(names) / seconds, 1), "images in mixed forwards": mixed}


def _metric_sum(text: str, name: str, keep: Callable[[str], bool]) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and keep(line.split("}")[0]):
            total += float(line.rsplit(" ", 1)[1])
    return total


def step_onnx(plan: Plan) -> dict[str, Any]:
    import onnxruntime

    import visionlora
    from visionlora.deploy.export import export_run

    folder = plan.work / "onnx"
    export_run(plan.work / "runs" / "ants", folder, "onnx", overwrite=True)
    run = visionlora.load(folder, device=plan.device)
    images = sorted((plan.data / "val").rglob("*.png"))[:8]
    predictions = run.predict(images)
    session = getattr(run.model, "session", None)
    providers = session.get_providers() if session is not None else []
    return {"predicted": len(predictions), "providers": ",".join(providers),
            "available": ",".join(onnxruntime.get_available_providers())}


def step_packed(plan: Plan) -> dict[str, Any]:
    """``train-many`` of 8 jobs at the run's batch size, packed, against the same 8 trained one after another
    in this process; step images/s of each, and the packed steps' model FLOP utilisation."""
    import json

    import torch

    from visionlora.training.engine import train
    from visionlora.training.many import PACKING_FILE, train_many
    from visionlora.training.packing import Job

    jobs = [Job(f"job{i}", settings(plan, plan.work / "packed" / f"job{i}", lr=1e-4 * (i + 1), epochs=1))
            for i in range(plan.packed_jobs)]
    outcomes = train_many(jobs, plan.work / "packed", say=lambda line: None)
    failed = [o for o in outcomes if o.status != "done" or not o.packed]
    if failed:
        raise RuntimeError(f"{failed[0].name}: {failed[0].error or failed[0].why_alone}")
    packed = json.loads((plan.work / "packed" / PACKING_FILE).read_text())["packs"][0]["images_per_second"]
    alone = [_step_rate(train(settings(plan, plan.work / "alone" / job.name, lr=job.cfg.lr, epochs=1)))
             for job in jobs]
    sequential = sum(rate[0] for rate in alone) / sum(rate[1] for rate in alone)
    peak = _dense_bf16_peak(torch.device(plan.device))
    flops = _flops_per_image(plan) * packed
    return {"jobs": plan.packed_jobs, "batch each": plan.batch_size, "packed images/s": packed,
            "sequential images/s": round(sequential, 1), "packed/sequential": round(packed / sequential, 2),
            "packed MFU": f"{flops / peak:.1%}" if peak else "-"}


def _step_rate(result) -> tuple[float, float]:
    """(images, seconds) of a finished run's training steps."""
    timing = (result.summary or {})["time"]
    return timing["train_images_per_second"] * timing["train_seconds"], timing["train_seconds"]


def _flops_per_image(plan: Plan) -> float:
    """FLOPs of one LoRA training step of the run's model, per image (``torch.utils.flop_counter``)."""
    model, info, task, batch, precision = _lora_step_parts(plan, plan.batch_size)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        _lora_step(model, info, task, batch, precision)
    return counter.get_total_flops() / plan.batch_size


def step_throughput(plan: Plan) -> dict[str, Any]:
    """LoRA training steps of the run's model at ``throughput_batch`` images, bf16 autocast where native."""
    from torch.utils.flop_counter import FlopCounterMode

    model, info, task, batch, precision = _lora_step_parts(plan, plan.throughput_batch)

    def train_step() -> None:
        _lora_step(model, info, task, batch, precision)

    with FlopCounterMode(display=False) as counter:
        train_step()
    seconds = _timed(train_step, steps=3 if plan.dry_run else 10)
    flops = counter.get_total_flops() / seconds
    peak = _dense_bf16_peak(batch["pixel_values"].device)
    return {"precision": precision.replace("no", "fp32"), "batch": plan.throughput_batch,
            "images/s": round(plan.throughput_batch / seconds, 1), "TFLOP/s": round(flops / 1e12, 2),
            "MFU": f"{flops / peak:.1%}" if peak else "-"}


def _lora_step_parts(plan: Plan, batch_size: int):
    """(model with the preset's LoRA adapter on the device, info, task, a random batch, precision)."""
    import torch

    from visionlora.modeling.adapters import apply_adapter
    from visionlora.runtime import resolve_precision
    from visionlora.tasks import get_task

    task = get_task("classification")
    labels = ["a", "b", "c", "d"]
    model, processor, info = task.model.build_model(plan.model, labels, None, "lora")
    preset = task.preset
    model, _ = apply_adapter(model, preset.lora_r, preset.lora_alpha, 0.0, list(preset.target_modules),
                             task.model.head_modules(model))
    device = torch.device(plan.device)
    model.to(device).train()
    precision = resolve_precision("auto")[0] if device.type != "cpu" or not plan.dry_run else "no"
    height, width = info.image_size["height"], info.image_size["width"]
    batch = {"pixel_values": torch.randn(batch_size, 3, height, width, device=device),
             "labels": torch.arange(batch_size, device=device) % len(labels)}
    model.step_optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, info, task, batch, precision


def _lora_step(model, info, task, batch, precision: str) -> None:
    import torch

    device_type = batch["pixel_values"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = task.steps.loss(model, batch, info)
    loss.backward()
    model.step_optimizer.step()
    model.step_optimizer.zero_grad(set_to_none=True)


def _timed(step: Callable[[], None], steps: int) -> float:
    """Seconds per step, from an idle device to an idle device, after two warm-up steps."""
    for _ in range(2):
        step()
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return (time.perf_counter() - started) / steps


def _dense_bf16_peak(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DENSE_BF16_PEAKS.items() if key in name), None)


STEPS: list[tuple[str, Callable[[Plan], dict[str, Any]]]] = [
    ("train", step_train), ("resume", step_resume), ("predict+evaluate", step_predict_and_evaluate),
    ("serve", step_serve), ("onnx", step_onnx), ("packed", step_packed), ("throughput", step_throughput),
]


def run_steps(plan: Plan) -> list[dict[str, Any]]:
    from visionlora.examples.synthetic import make_classification_folder

    make_classification_folder(plan.data, per_class_train=plan.images_per_class,
                               per_class_val=max(4, plan.images_per_class // 4))
    rows = []
    for name, step in STEPS:
        synchronize()
        started = time.perf_counter()
        try:
            detail, ok = step(plan), "ok"
        except Exception as err:  # one line per failed step; the others still run
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            detail, ok = {"error": f"{type(err).__name__}: {first_line}"}, "FAIL"
            if os.environ.get("GPU_CHECK_TRACEBACKS"):
                traceback.print_exc()
        synchronize()
        rows.append({"step": name, "result": ok, "seconds": round(time.perf_counter() - started, 2),
                     "detail": ", ".join(f"{key} {value}" for key, value in detail.items())})
        print(f"{name}: {ok} {rows[-1]['detail']}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny models")
    parser.add_argument("--work", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        plan = Plan(args.dry_run, Path(args.work) if args.work else Path(tmp))
        print(f"device {plan.device}{' (dry run)' if args.dry_run else ''}: {_describe_device(plan.device)}")
        rows = run_steps(plan)
    print()
    print(table(rows, ["step", "result", "seconds", "detail"]))
    return 0 if all(row["result"] == "ok" for row in rows) else 1


def _describe_device(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"torch {torch.__version__}, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
