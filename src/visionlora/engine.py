"""The training recipe, top to bottom: data -> model -> adapter -> loop -> artifacts.

One loop for every task, on Accelerate (CPU, GPU, mixed precision, several processes).
Features: AdamW with warmup + cosine decay, gradient clipping and accumulation,
evaluation every epoch, the best epoch's weights kept by the task's main metric,
early stopping, seeded data order and augmentation, a progress bar.
"""

from __future__ import annotations

import math
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from visionlora import __version__
from visionlora.adapters import LoraSetup, apply_lora, parameter_counts
from visionlora.artifacts import (
    INFO_FILE,
    RunPaths,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    folder_bytes,
    history_csv,
    new_run_dir,
    save_plots,
)
from visionlora.config import TrainConfig
from visionlora.errors import VisionLoraError
from visionlora.models import is_builtin
from visionlora.tasks import get_task
from visionlora.tasks.base import Datasets, ModelInfo, Task


@dataclass
class RunResult:
    """What a finished run produced: its folder, summary and the trained model in memory."""

    paths: RunPaths
    summary: dict[str, Any]
    model: torch.nn.Module
    processor: Any
    info: ModelInfo


def train(cfg: TrainConfig) -> RunResult:
    """Train one model as ``cfg`` says and write its run folder."""
    from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed

    started = time.perf_counter()
    cfg.validate()
    task = get_task(cfg.task)
    accelerator = new_accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    root = [new_run_dir(cfg.task, cfg.mode, cfg.output, cfg.overwrite) if accelerator.is_main_process else None]
    broadcast_object_list(root)
    paths = RunPaths(Path(root[0]), cfg.mode)

    # -- data and model -----------------------------------------------------------------
    set_seed(cfg.seed)
    source = task.read_data(cfg)
    model, processor, info = task.build_model(cfg.model, source.labels, cfg.image_size)
    info.mode = cfg.mode
    base_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    data = task.make_datasets(source, processor, info, cfg)
    lora: LoraSetup | None = None
    if cfg.mode == "lora":
        if is_builtin(cfg.model) and accelerator.is_main_process:
            _save_full_model(model, processor, info, paths.base_dir)
        model, lora = apply_lora(
            model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, task.head_modules(model)
        )
    params = parameter_counts(model)
    accelerator.print(_describe_start(cfg, data, params, lora, paths))

    # -- loop ---------------------------------------------------------------------------
    loop = _TrainingLoop(cfg, task, info, accelerator, model, data)
    history = loop.run()
    model = accelerator.unwrap_model(loop.model)

    # -- artifacts ----------------------------------------------------------------------
    summary = None
    if accelerator.is_main_process:
        _save_trained_model(model, processor, info, paths, cfg)
        summary = _write_results(cfg, task, paths, history, loop, data, params, lora, base_bytes, started)
        accelerator.print(f"saved {paths.model_dir} and {paths.results_dir}")
    accelerator.wait_for_everyone()
    return RunResult(paths, summary, model, processor, info)


def new_accelerator(**kwargs):
    """An Accelerator with these settings, even if another run in this process used others.

    Accelerate keeps its settings in process-wide singletons; the per-run part is reset
    (the process group, if any, is kept) so that runs with different precision can follow
    one another, as in ``demo`` or ``compare``.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(**kwargs)


class _TrainingLoop:
    """Epochs of training and evaluation, keeping the best epoch's weights."""

    def __init__(self, cfg: TrainConfig, task: Task, info: ModelInfo, accelerator, model, data: Datasets):
        self.cfg, self.task, self.info, self.accelerator, self.data = cfg, task, info, accelerator, data
        loader_args = dict(batch_size=cfg.batch_size, collate_fn=task.collate, num_workers=cfg.num_workers)
        train_loader = torch.utils.data.DataLoader(data.train, shuffle=True, drop_last=False, **loader_args)
        val_loader = torch.utils.data.DataLoader(data.val, shuffle=False, **loader_args)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.kept_names = {n for n, p in model.named_parameters() if p.requires_grad}
        self.kept_names |= {n for n, _ in model.named_buffers()}
        optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model, self.optimizer, self.train_loader, self.val_loader = accelerator.prepare(
            model, optimizer, train_loader, val_loader
        )
        self.scheduler = accelerator.prepare(self._schedule())
        self.best_epoch, self.best_value, self.best_state, self.best_metrics = 0, None, None, {}
        self.train_seconds, self.images_seen, self.early_stopped = 0.0, 0, False

    def _schedule(self):
        from transformers import get_cosine_schedule_with_warmup

        steps_per_epoch = math.ceil(len(self.train_loader) / self.cfg.grad_accum)
        total = steps_per_epoch * self.cfg.epochs * self.accelerator.num_processes
        return get_cosine_schedule_with_warmup(self.optimizer, round(total * self.cfg.warmup_ratio), total)

    def run(self) -> list[dict[str, Any]]:
        history = []
        stale = 0
        for epoch in range(1, self.cfg.epochs + 1):
            row = {"epoch": epoch, "train_loss": self._train_epoch(epoch), "lr": self.scheduler.get_last_lr()[0]}
            metrics = self.task.evaluate(self.model, self.val_loader, self.accelerator, self.info)
            row.update({f"val_{k}": v for k, v in metrics.items()})
            row["seconds"] = round(time.perf_counter() - self._epoch_started, 3)
            history.append(row)
            improved = self._track_best(epoch, metrics)
            stale = 0 if improved else stale + 1
            self.accelerator.print(_describe_epoch(row, self.cfg.epochs, self.task.main_metric, improved))
            if self.cfg.patience and stale >= self.cfg.patience:
                self.early_stopped = True
                self.accelerator.print(f"early stop: no better {self.task.main_metric} for {stale} epochs")
                break
        self._restore_best()
        return history

    def _train_epoch(self, epoch: int) -> float:
        from tqdm.auto import tqdm

        self._epoch_started = time.perf_counter()
        self.model.train()
        if self.cfg.mode == "lora":
            _freeze_batchnorm_statistics(self.model)
        if hasattr(self.data.train, "set_epoch"):
            self.data.train.set_epoch(epoch)
        self.train_loader.set_epoch(epoch)
        show = self.cfg.progress and self.accelerator.is_local_main_process
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{self.cfg.epochs}", leave=False, disable=not show)
        total, batches = 0.0, 0
        for step, batch in enumerate(bar, start=1):
            with self.accelerator.accumulate(self.model):
                loss = self.task.loss(self.model, batch, self.info)
                if not torch.isfinite(loss):
                    raise VisionLoraError(
                        f"training diverged: loss is {loss.item()} at epoch {epoch} step {step}; try a lower --lr"
                    )
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients and self.cfg.grad_clip > 0:
                    self.accelerator.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.item()
            batches += 1
            self.images_seen += _batch_size(batch) * self.accelerator.num_processes
            bar.set_postfix(loss=f"{total / batches:.4f}")
        self.train_seconds += time.perf_counter() - self._epoch_started
        mean = torch.tensor([total / max(batches, 1)], device=self.accelerator.device)
        return float(self.accelerator.reduce(mean, reduction="mean"))

    def _track_best(self, epoch: int, metrics: dict[str, Any]) -> bool:
        value = metrics[self.task.main_metric]
        better = self.best_value is None or (
            value > self.best_value if self.task.greater_is_better else value < self.best_value
        )
        if better:
            self.best_epoch, self.best_value, self.best_metrics = epoch, value, metrics
            model = self.accelerator.unwrap_model(self.model)
            self.best_state = {
                name: tensor.detach().clone()
                for name, tensor in model.state_dict().items()
                if name in self.kept_names
            }
        return better

    def _restore_best(self) -> None:
        if self.best_state is not None:
            self.accelerator.unwrap_model(self.model).load_state_dict(self.best_state, strict=False)


def _freeze_batchnorm_statistics(model: torch.nn.Module) -> None:
    """Keep BatchNorm running statistics fixed: they belong to the frozen base, not the adapter."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def _save_full_model(model, processor, info: ModelInfo, target: Path) -> None:
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / INFO_FILE, info.to_dict())


def _save_trained_model(model, processor, info: ModelInfo, paths: RunPaths, cfg: TrainConfig) -> None:
    """The adapter (LoRA) or the whole model (full), with the processor and visionlora.json."""
    if cfg.mode == "full":
        _save_full_model(model, processor, info, paths.model_dir)
        return
    if is_builtin(cfg.model):
        model.peft_config["default"].base_model_name_or_path = str(paths.base_dir.resolve())
    with atomic_dir(paths.model_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / INFO_FILE, info.to_dict())


def _write_results(cfg, task, paths, history, loop, data, params, lora, base_bytes, started) -> dict[str, Any]:
    """history.csv, the plots, then the summary (last, marking the run complete)."""
    results = paths.results_dir
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(results / "history.csv", history_csv(history).encode())
    save_plots(history, results, task.main_metric)
    weights = next(iter(sorted(paths.model_dir.glob("*.safetensors"))), None)
    summary = {
        "completed": True,
        "task": cfg.task,
        "mode": cfg.mode,
        "base_model": cfg.model,
        "run_dir": str(paths.root),
        "data": {
            **data.description,
            "counts": data.counts,
            "skipped_count": len(data.skipped),
            "skipped": data.skipped,
        },
        "training": {**cfg.to_dict(), "epochs_run": len(history), "early_stopped": loop.early_stopped},
        "lora": None if lora is None else {"requested": lora.requested, "resolved": lora.resolved},
        "parameters": params,
        "sizes": {
            "saved_model_bytes": folder_bytes(paths.model_dir),
            "weights_file_bytes": weights.stat().st_size if weights else None,
            "base_model_bytes": base_bytes,
        },
        "main_metric": task.main_metric,
        "best_epoch": loop.best_epoch,
        "metrics": loop.best_metrics,
        "time": {
            "wall_seconds": round(time.perf_counter() - started, 3),
            "train_seconds": round(loop.train_seconds, 3),
            "train_images_per_second": round(loop.images_seen / max(loop.train_seconds, 1e-9), 2),
        },
        "memory": _peak_memory(),
        "versions": _versions(),
    }
    atomic_write_json(paths.summary, summary)
    return summary


def _peak_memory() -> dict[str, Any]:
    peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        peak["peak_accelerator_bytes"] = torch.cuda.max_memory_allocated()
    return peak


def _versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    return {
        "visionlora": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }


def _batch_size(batch: dict[str, Any]) -> int:
    return len(batch["pixel_values"])


def _describe_start(cfg, data: Datasets, params, lora, paths) -> str:
    adapter = f", LoRA r={cfg.lora_r} on {', '.join(lora.resolved['target_modules'])}" if lora else ""
    skipped = f", {len(data.skipped)} files skipped" if data.skipped else ""
    return (
        f"{cfg.task} | {cfg.mode}{adapter} | model {cfg.model} | "
        f"{data.counts['train']} train / {data.counts['val']} val images{skipped} | "
        f"{params['trainable']:,} of {params['total']:,} parameters trainable "
        f"({params['trainable_percent']:.2f}%) | run {paths.root}"
    )


def _describe_epoch(row: dict[str, Any], epochs: int, main_metric: str, improved: bool) -> str:
    main = row.get(f"val_{main_metric}")
    marker = " *" if improved else ""
    return (
        f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  "
        f"val_loss {row['val_loss']:.4f}  {main_metric} {main:.4f}{marker}  ({row['seconds']:.1f}s)"
    )
