"""The training recipe, top to bottom: data -> model -> adapter -> loop -> artifacts.

One loop for every task, on Accelerate (CPU, GPU, mixed precision, several processes).
Features: AdamW with warmup + cosine decay, gradient clipping and accumulation,
evaluation every epoch, the best epoch's weights kept by the task's main metric,
early stopping, seeded data order and augmentation, a progress bar, checkpoints every
epoch and every N steps with exact resume, and a stop with a message on a NaN loss.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import shutil
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
from visionlora.checkpoint import Progress, checkpoint_dir, load_checkpoint, read_progress, save_checkpoint
from visionlora.config import TrainConfig
from visionlora.errors import VisionLoraError
from visionlora.models import is_builtin, loading_policy
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
    return _run(cfg.validate(), None)


def resume(run_dir: str | Path, settings: dict[str, Any] | None = None) -> RunResult:
    """Continue the run in ``run_dir`` from its last checkpoint, with the settings it started with.

    ``settings`` (e.g. the flags given with ``--resume``) must agree with the run's own,
    except where they only change how it is shown or loaded (progress bar, data workers).
    """
    cfg, progress = _resume_settings(Path(run_dir), settings or {})
    return _run(cfg.validate(), progress)


def _run(cfg: TrainConfig, progress: Progress | None) -> RunResult:
    from accelerate.utils import DataLoaderConfiguration, broadcast_object_list

    started = time.perf_counter()
    if cfg.low_memory:
        return_freed_memory()
    task = get_task(cfg.task)
    accelerator = new_accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    if progress is None:
        root = [new_run_dir(cfg.task, cfg.mode, cfg.output, cfg.overwrite) if accelerator.is_main_process else None]
        broadcast_object_list(root)
    else:
        root = [cfg.output]
    paths = RunPaths(Path(root[0]), cfg.mode)
    try:
        with loading_policy(cfg.allow_pickle, cfg.trust_remote_code):
            return _train_in(paths, cfg, task, accelerator, progress, started)
    except BaseException:
        if progress is None and accelerator.is_main_process and not checkpoint_dir(paths.root).exists():
            shutil.rmtree(paths.root, ignore_errors=True)  # nothing worth keeping: leave no half-run behind
        raise


def _train_in(paths: RunPaths, cfg: TrainConfig, task: Task, accelerator, progress: Progress | None, started: float):
    from accelerate.utils import set_seed

    # -- data and model -----------------------------------------------------------------
    set_seed(cfg.seed)
    source = task.read_data(cfg)
    model, processor, info = task.build_model(cfg.model, source.labels, cfg.image_size)
    info.mode = cfg.mode
    base_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    data = task.make_datasets(source, processor, info, cfg)
    lora: LoraSetup | None = None
    if cfg.mode == "lora":
        if is_builtin(cfg.model) and accelerator.is_main_process and not paths.base_dir.exists():
            _save_model(model, processor, info, paths.base_dir)
        model, lora = apply_lora(
            model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, task.head_modules(model)
        )
    params = parameter_counts(model)
    accelerator.print(_describe_start(cfg, data, params, lora, paths))

    # -- loop ---------------------------------------------------------------------------
    loop = _TrainingLoop(cfg, task, info, accelerator, model, data, paths.root)
    if progress is not None:
        loop.restore(progress)
        accelerator.print(f"resumed after epoch {progress.completed_epochs}, batch {progress.batches_done}")
    history = loop.run()
    model = accelerator.unwrap_model(loop.model)

    # -- artifacts ----------------------------------------------------------------------
    summary = None
    if accelerator.is_main_process:
        _save_trained_model(model, processor, info, paths, cfg)
        summary = _write_results(cfg, task, paths, history, loop, data, params, lora, base_bytes, started)
        shutil.rmtree(checkpoint_dir(paths.root), ignore_errors=True)
        accelerator.print(f"saved {paths.model_dir} and {paths.results_dir}")
    accelerator.wait_for_everyone()
    return RunResult(paths, summary, model, processor, info)


RESUME_FREE = {"output", "overwrite", "progress", "num_workers"}


def _resume_settings(root: Path, settings: dict[str, Any]) -> tuple[TrainConfig, Progress]:
    """The run's saved settings and progress; ``settings`` given now must agree with them."""
    for results in ("training_results_lora", "training_results"):
        if (root / results / "training_summary.json").is_file():
            raise VisionLoraError(f"{root}: this run already completed; nothing to resume")
    progress = read_progress(root)
    saved = TrainConfig.from_dict(progress.config)
    differing = [
        f"--{k.replace('_', '-')} {v!r} (the run used {getattr(saved, k)!r})"
        for k, v in settings.items()
        if k not in RESUME_FREE and v is not None and v != getattr(saved, k)
    ]
    if differing:
        raise VisionLoraError(f"{root}: --resume continues with the run's own settings, but these differ: {'; '.join(differing)}")
    saved.output = str(root)
    for key in ("progress", "num_workers"):
        if settings.get(key) is not None:
            setattr(saved, key, settings[key])
    return saved, progress


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Have glibc's malloc serve allocations over ``threshold`` bytes with their own mappings.

    By default glibc raises that threshold as large blocks are freed, and from then on keeps
    freed activation memory in its heap: a LoRA step on ViT-Base then peaks ~45% above the
    memory it uses. Fixed mappings give the memory back at once, at the cost of page faults.
    Returns False where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3 is M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        kwargs.setdefault("cpu", True)  # several CPU processes (torchrun): Accelerate's gloo backend
    return Accelerator(**kwargs)


class _TrainingLoop:
    """Epochs of training and evaluation, keeping the best epoch's weights and checkpointing."""

    def __init__(self, cfg: TrainConfig, task: Task, info: ModelInfo, accelerator, model, data: Datasets, root: Path):
        self.cfg, self.task, self.info, self.accelerator, self.data, self.root = cfg, task, info, accelerator, data, root
        # Loaders draw their worker seeds from their own generators, not the global RNG that
        # dropout uses, so a resumed run sees the same random numbers as an uninterrupted one.
        loader_args = dict(batch_size=cfg.batch_size, collate_fn=task.collate, num_workers=cfg.num_workers)
        train_loader = torch.utils.data.DataLoader(
            data.train, shuffle=True, drop_last=False, generator=torch.Generator().manual_seed(cfg.seed), **loader_args
        )
        val_loader = torch.utils.data.DataLoader(
            data.val, shuffle=False, generator=torch.Generator().manual_seed(cfg.seed), **loader_args
        )
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.kept_names = {n for n, p in model.named_parameters() if p.requires_grad}
        self.kept_names |= {n for n, _ in model.named_buffers()}
        optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model, self.optimizer, self.train_loader, self.val_loader = accelerator.prepare(
            model, optimizer, train_loader, val_loader
        )
        self.scheduler = accelerator.prepare(self._schedule())
        self.state = Progress(config=cfg.to_dict())
        self.best_state: dict[str, torch.Tensor] | None = None
        self.early_stopped = False

    def _schedule(self):
        from transformers import get_cosine_schedule_with_warmup

        steps_per_epoch = math.ceil(len(self.train_loader) / self.cfg.grad_accum)
        total = steps_per_epoch * self.cfg.epochs * self.accelerator.num_processes
        return get_cosine_schedule_with_warmup(self.optimizer, round(total * self.cfg.warmup_ratio), total)

    def run(self) -> list[dict[str, Any]]:
        state = self.state
        for epoch in range(state.completed_epochs + 1, self.cfg.epochs + 1):
            row = {"epoch": epoch, "train_loss": self._train_epoch(epoch), "lr": self.scheduler.get_last_lr()[0]}
            metrics = self.task.evaluate(self.model, self.val_loader, self.accelerator, self.info)
            row.update({f"val_{k}": v for k, v in metrics.items()})
            row["seconds"] = round(time.perf_counter() - self._epoch_started, 3)
            state.history.append(row)
            improved = self._track_best(epoch, metrics)
            state.stale_epochs = 0 if improved else state.stale_epochs + 1
            state.completed_epochs, state.batches_done, state.loss_total = epoch, 0, 0.0
            self.accelerator.print(_describe_epoch(row, self.cfg.epochs, self.task.main_metric, improved))
            stop = bool(self.cfg.patience and state.stale_epochs >= self.cfg.patience)
            if epoch < self.cfg.epochs and not stop:
                self._save_checkpoint()
            if stop:
                self.early_stopped = True
                self.accelerator.print(f"early stop: no better {self.task.main_metric} for {state.stale_epochs} epochs")
                break
        self._restore_best()
        return state.history

    def _train_epoch(self, epoch: int) -> float:
        from accelerate import skip_first_batches
        from tqdm.auto import tqdm

        state = self.state
        self._epoch_started = time.perf_counter()
        self.model.train()
        if self.cfg.mode == "lora":
            _freeze_batchnorm_statistics(self.model)
        if hasattr(self.data.train, "set_epoch"):
            self.data.train.set_epoch(epoch)
        self.train_loader.set_epoch(epoch)
        skipped = state.batches_done
        loader = skip_first_batches(self.train_loader, skipped) if skipped else self.train_loader
        show = self.cfg.progress and self.accelerator.is_local_main_process
        bar = tqdm(loader, desc=f"epoch {epoch}/{self.cfg.epochs}", leave=False, disable=not show,
                   initial=skipped, total=len(self.train_loader))
        for batch in bar:
            with self.accelerator.accumulate(self.model):
                loss = self.task.loss(self.model, batch, self.info)
                if not torch.isfinite(loss):
                    raise VisionLoraError(self._diverged_message(loss, epoch))
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients and self.cfg.grad_clip > 0:
                    self.accelerator.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            state.loss_total += loss.item()
            state.batches_done += 1
            state.images_seen += _batch_size(batch) * self.accelerator.num_processes
            bar.set_postfix(loss=f"{state.loss_total / state.batches_done:.4f}")
            if self.accelerator.sync_gradients:
                state.global_step += 1
                last = state.batches_done == len(self.train_loader)
                if self.cfg.save_every and state.global_step % self.cfg.save_every == 0 and not last:
                    state.train_seconds += time.perf_counter() - self._epoch_started
                    self._epoch_started = time.perf_counter()
                    self._save_checkpoint()
        state.train_seconds += time.perf_counter() - self._epoch_started
        mean = torch.tensor([state.loss_total / max(state.batches_done, 1)], device=self.accelerator.device)
        return float(self.accelerator.reduce(mean, reduction="mean"))

    def _diverged_message(self, loss: torch.Tensor, epoch: int) -> str:
        where = f"epoch {epoch}, batch {self.state.batches_done + 1}"
        if checkpoint_dir(self.root).exists():
            kept = f"the last good checkpoint is kept in {checkpoint_dir(self.root)}"
        else:
            kept = "no checkpoint was saved yet"
        return f"training diverged: loss is {loss.item()} at {where}; {kept}; try a lower --lr"

    def _trained_weights(self) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.model)
        return {name: t.detach().clone() for name, t in model.state_dict().items() if name in self.kept_names}

    def _track_best(self, epoch: int, metrics: dict[str, Any]) -> bool:
        value = metrics[self.task.main_metric]
        best = self.state.best_value
        better = best is None or (value > best if self.task.greater_is_better else value < best)
        if better:
            self.state.best_epoch, self.state.best_value, self.state.best_metrics = epoch, value, metrics
            self.best_state = self._trained_weights()
        return better

    def _restore_best(self) -> None:
        if self.best_state is not None:
            self.accelerator.unwrap_model(self.model).load_state_dict(self.best_state, strict=False)

    # -- checkpoints --------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        if self.accelerator.is_main_process:
            save_checkpoint(self.root, self._trained_weights(), self.best_state, self.optimizer, self.scheduler, self.state)
        self.accelerator.wait_for_everyone()

    def restore(self, progress: Progress) -> None:
        """Continue from the checkpoint whose progress is ``progress``."""
        trained, best, state = load_checkpoint(self.root)
        model = self.accelerator.unwrap_model(self.model)
        missing = self.kept_names - set(trained)
        if missing:
            raise VisionLoraError(f"{checkpoint_dir(self.root)}: checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[0]}")
        model.load_state_dict(trained, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.state, self.best_state = progress, best


def _freeze_batchnorm_statistics(model: torch.nn.Module) -> None:
    """Keep BatchNorm running statistics fixed: they belong to the frozen base, not the adapter."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def _save_model(model, processor, info: ModelInfo, target: Path) -> None:
    """``model.save_pretrained`` (full weights, or the adapter of a peft model), the processor
    and visionlora.json, written together into ``target``."""
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / INFO_FILE, info.to_dict())


def _save_trained_model(model, processor, info: ModelInfo, paths: RunPaths, cfg: TrainConfig) -> None:
    """The adapter (LoRA) or the whole model (full), with the processor and visionlora.json."""
    if cfg.mode == "lora" and is_builtin(cfg.model):
        model.peft_config["default"].base_model_name_or_path = str(paths.base_dir.resolve())
    _save_model(model, processor, info, paths.model_dir)


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
        "best_epoch": loop.state.best_epoch,
        "metrics": loop.state.best_metrics,
        "time": {
            "wall_seconds": round(time.perf_counter() - started, 3),
            "train_seconds": round(loop.state.train_seconds, 3),
            "train_images_per_second": round(loop.state.images_seen / max(loop.state.train_seconds, 1e-9), 2),
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
