"""Serving through onnxruntime on a CPU: requests/s, resident memory of 10 adapters, int8's metric drop.

    python benchmarks/onnx_serving.py [--models vit-base,vitpose-base,rtdetr-r18] [--requests 48]

For ViT-B/16 (224 px), ViTPose-B (256x192) and RT-DETRv2-R18 (640 px), each with 10 LoRA
adapters of the task's preset over one config-built random base (one trained a step, as in
``benchmarks/export.py``, the others its copies with other random adapter and head weights):

1. requests/s of a real ``visionlora serve`` on loopback at concurrency 8, a fixed number of
   requests each, for: PyTorch with the adapter; ``--format onnx`` (fp32); ``--format onnx
   --quantize int8``; ``--format onnx-adapters`` (requests spread over the 10 adapters);
2. resident memory (VmRSS, a fresh process each, after one prediction per model) of 1 and 10
   PyTorch adapters over one base, 1 and 10 ONNX adapters over one ONNX base, and 10 merged
   ONNX models;
3. the int8 main-metric drop of a model this script fine-tunes: the built-in pretrained
   classification twin on generated colour classes, exported with ``--quantize int8``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import report, run_isolated, table  # noqa: E402
from export import MODELS, make_run  # noqa: E402
from serve import png, post, start_serve  # noqa: E402

ADAPTERS = 10
CONCURRENCY = 8


def make_runs(name: str, root: Path) -> list[Path]:
    """``ADAPTERS`` LoRA runs over one base: one trained a step (``export.make_run``), the others its
    copies with other random adapter and head weights."""
    import torch
    from safetensors.torch import load_file, save_file

    first, _ = make_run(name, root)
    runs = [first]
    for index in range(1, ADAPTERS):
        copy = root / f"run{index}"
        shutil.copytree(first, copy)
        weights_file = copy / "trained_model_lora" / "adapter_model.safetensors"
        generator = torch.Generator().manual_seed(index)
        weights = {key: value + 0.01 * torch.randn(value.shape, generator=generator)
                   for key, value in load_file(str(weights_file)).items()}
        save_file(weights, str(weights_file))
        runs.append(copy)
    return runs


def build(name: str, root: Path) -> dict[str, list[Path]]:
    """The runs and every export the measurements serve."""
    from visionlora.deploy.export import export_run
    from visionlora.deploy.onnx_adapters import export_adapters

    runs = make_runs(name, root)
    export_run(runs[0], root / "onnx", "onnx", strict=False)  # random weights: near-tied scores may decode apart
    export_run(runs[0], root / "int8", "onnx", strict=False, quantize="int8")
    merged = []
    for index in range(ADAPTERS):  # ten copies: each is loaded into a session of its own, as ten models would be
        shutil.copytree(root / "onnx", root / f"onnx{index}")
        merged.append(root / f"onnx{index}")
    export_adapters(runs, root / "adapters", say=lambda line: None)
    adapters = sorted(p for p in (root / "adapters").iterdir() if (p / "adapter.onnx_adapter").is_file())
    return {"pytorch": runs, "onnx": [root / "onnx"], "int8": [root / "int8"], "adapters": adapters,
            "merged onnx": merged}


def requests_per_second(folders: list[Path], requests: int) -> float:
    """A ``visionlora serve`` of ``folders`` on loopback; ``requests`` requests, CONCURRENCY at a time,
    spread over the folders' models."""
    process, url = start_serve([*(f"m{index}={folder}" for index, folder in enumerate(folders)),
                                "--max-batch-size", str(CONCURRENCY)])
    image = png(480)
    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:  # one warm-up round, then the timed requests
            ask = lambda index: post(f"{url}/v1/models/m{index % len(folders)}/predict", image)  # noqa: E731
            list(pool.map(ask, range(CONCURRENCY)))
            started = time.perf_counter()
            list(pool.map(ask, range(requests)))
            return requests / (time.perf_counter() - started)
    finally:
        process.terminate()
        process.wait(timeout=60)


def memory_worker(setup: str, count: str, root: str) -> None:
    """Resident memory of a store holding ``count`` models of ``setup``, each having predicted once."""
    import onnxruntime  # noqa: F401  (loaded in every setup, so the baseline holds both engines' libraries)
    from PIL import Image

    from visionlora.serving.models import ModelStore

    folders = json.loads((Path(root) / "folders.json").read_text()).get(setup, [])[: int(count)]
    store = ModelStore("cpu")
    image = Image.new("RGB", (640, 480), (90, 140, 200))
    for index, folder in enumerate(folders):
        store.add(f"m{index}", folder).predict([image])
    rss = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    report({"setup": setup, "models": int(count), "rss_mb": rss / 1024})


def int8_drop() -> dict:
    """Fine-tune the pretrained classification twin on generated colours; export it as int8 (strict)."""
    from visionlora.config import TrainConfig
    from visionlora.deploy.export import export_run
    from visionlora.examples.synthetic import make_classification_folder
    from visionlora.training.engine import train

    with tempfile.TemporaryDirectory() as tmp:
        data = make_classification_folder(Path(tmp) / "data", per_class_train=40, per_class_val=25)
        cfg = TrainConfig(task="classification", data=str(data), model="tiny-pretrained", epochs=6, lora_r=16,
                          lora_alpha=32, target_modules=["query", "value"], lr=2e-4, output=str(Path(tmp) / "run"),
                          progress=False, mixed_precision="no").validate()
        run = train(cfg).paths.root
        record = export_run(run, Path(tmp) / "int8", "onnx", quantize="int8", strict=False)["quantization"]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=3, metavar=("SETUP", "COUNT", "ROOT"))
    parser.add_argument("--models", default="vit-base,vitpose-base,rtdetr-r18")
    parser.add_argument("--requests", type=int, default=48)
    args = parser.parse_args()
    if args.worker:
        return memory_worker(*args.worker)
    speed, memory = [], []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            folders = build(name, Path(tmp))
            (Path(tmp) / "folders.json").write_text(json.dumps({k: [str(p) for p in v] for k, v in folders.items()}))
            baseline = None
            for setup in ("pytorch", "onnx", "int8", "adapters"):
                served = folders[setup] if setup == "adapters" else folders[setup][:1]
                rate = requests_per_second(served, args.requests)
                baseline = baseline or rate
                speed.append({"model": MODELS[name][1], "served": setup, "requests/s": rate,
                              "vs pytorch": rate / baseline})
            baseline = run_isolated(__file__, ["nothing", "0", tmp])["rss_mb"]
            one = {}
            for setup, count in (("pytorch", 1), ("pytorch", ADAPTERS), ("adapters", 1), ("adapters", ADAPTERS),
                                 ("merged onnx", ADAPTERS)):
                rss = run_isolated(__file__, [setup, str(count), tmp])["rss_mb"]
                one.setdefault(setup, rss)
                reference = one["adapters"] if setup == "merged onnx" else one[setup]
                memory.append({"model": MODELS[name][1], "setup": setup, "models": count, "rss_mb": rss,
                               "models_mb": rss - baseline, "vs 1 adapter": rss / reference,
                               "models vs 1 adapter": (rss - baseline) / (reference - baseline)})
        print(f"{name} done", file=sys.stderr, flush=True)
    drop = int8_drop()
    print(f"visionlora serve at concurrency {CONCURRENCY} ({args.requests} requests; adapters: spread over "
          f"{ADAPTERS}), fp32 unless int8")
    print(table(speed, ["model", "served", "requests/s", "vs pytorch"]))
    print(f"\nresident memory with {ADAPTERS} models, each having predicted once (a fresh process each); models_mb "
          "is above a process with torch and onnxruntime loaded and nothing served; merged onnx is compared "
          "with 1 ONNX adapter")
    print(table(memory, ["model", "setup", "models", "rss_mb", "models_mb", "vs 1 adapter", "models vs 1 adapter"]))
    print(f"\nint8 on the fine-tuned pretrained twin (generated colours, {drop['main_metric']} on 100 validation "
          f"images): fp32 {drop['fp32']:.4f}, int8 {drop['int8']:.4f}, drop {drop['metric_drop']:.4f}; outputs max "
          f"|diff| {drop['max_abs_diff']:.3g}, top-1 agreement {drop['top1_agreement']:.1%}")


if __name__ == "__main__":
    main()
