"""The training recipe, top to bottom: data -> model -> adapter -> loop -> artifacts.

One loop for every task, on Accelerate (CPU, GPU, mixed precision, several processes).
Features: AdamW (no weight decay on biases and norm weights) with warmup + cosine decay,
gradient clipping and accumulation, evaluation every epoch, the best epoch's weights kept
by the task's main metric, early stopping, seeded data order and augmentation, a progress
bar, checkpoints every epoch and every N steps with exact resume, and a stop with a
message on a non-finite loss. The loss stays on the device between checks; it is checked
before every checkpoint and at every epoch's end, so no checkpoint holds diverged weights.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TypeVar

import torch

from visionlora.artifacts import RunPaths, new_run_dir, save_model
from visionlora.config import TrainConfig, parse_report_to, with_preset
from visionlora.console import describe_epoch, describe_start, library_messages_to
from visionlora.data.transforms import Normalizer
from visionlora.deploy.evaluation import evaluate, evaluate_outputs
from visionlora.errors import VisionLoraError
from visionlora.modeling.adapters import (
    apply_adapter,
    described_adapter,
    lower_frozen_weights,
    parameter_counts,
    restore_weights,
)
from visionlora.modeling.builtin import is_builtin
from visionlora.modeling.loading import base_revision, loading_policy
from visionlora.runtime import (
    accelerator_settings,
    new_accelerator,
    pick_device,
    reset_peak_memory,
    resolve_precision_on,
    return_freed_memory,
    unwrap_in_fp32,
)
from visionlora.tasks import get_task
from visionlora.tasks.base import Datasets, Evaluation, ModelInfo, Task
from visionlora.training import tracking
from visionlora.training.checkpoint import (
    Progress,
    load_checkpoint,
    restore_cuda_rng,
    resume_settings,
    save_checkpoint,
)
from visionlora.training.continuation import start_from_run
from visionlora.training.diagnostics import write_diagnostics
from visionlora.training.loading import plan_loading
from visionlora.training.results import RunFacts, write_results
from visionlora.training.sampling import EpochWeightedSampler

PROGRESS_EVERY = 10  # batches between progress-bar loss updates (each one reads the loss from the device)


@dataclass
class RunResult:
    """What a finished run produced: its folder, summary and the trained model in memory."""

    paths: RunPaths
    summary: dict[str, Any] | None  # None in the processes besides the main one
    model: torch.nn.Module
    processor: Any
    info: ModelInfo


def train(cfg: TrainConfig) -> RunResult:
    """Train one model as ``cfg`` says and write its run folder; settings left unset take the
    task's preset."""
    return _run(with_preset(cfg).validate(), None)


def resume(run_dir: str | Path, settings: dict[str, Any] | None = None) -> RunResult:
    """Continue the run in ``run_dir`` from its last checkpoint, with the settings it started with.

    ``settings`` (e.g. the flags given with ``--resume``) must agree with the run's own,
    except where they only change how it is shown or loaded (progress bar, data workers).
    """
    cfg, progress = resume_settings(Path(run_dir), settings or {})
    return _run(cfg.validate(), progress)


def _run(cfg: TrainConfig, progress: Progress | None) -> RunResult:
    from accelerate.utils import DataLoaderConfiguration, broadcast_object_list

    started = time.perf_counter()
    if cfg.low_memory:
        return_freed_memory()
    task = get_task(cfg.task)
    device = pick_device(cfg.device)
    precision = resolve_precision_on(device, cfg.mixed_precision, task.fp16_unsafe)
    trackers = parse_report_to(cfg.report_to)
    accelerator = new_accelerator(
        **accelerator_settings(device),
        mixed_precision=precision[0],
        log_with=trackers or None,
        project_dir=cfg.output or ".",  # the run folder is named below; tracking.start points the trackers into it
        gradient_accumulation_steps=cfg.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    reset_peak_memory()  # the summary's peak is this run's, not the highest of the runs before it in this process
    if progress is None:
        root: list[Path | str | None] = [new_run_dir(cfg.task, cfg.mode, cfg.output, cfg.overwrite)
                                         if accelerator.is_main_process else None]
        broadcast_object_list(root)
    else:
        root = [cfg.output]
    if root[0] is None:
        raise VisionLoraError("the run folder was not named")
    paths = RunPaths(Path(root[0]), cfg.mode)
    try:
        with loading_policy(cfg.allow_pickle, cfg.trust_remote_code, cfg.revision), library_messages_to(paths.log_file):
            tracking.start(accelerator, trackers, cfg.to_dict(), paths.tracking_dir)
            return _train_in(paths, cfg, task, accelerator, progress, RunFacts(cfg, precision, started))
    except BaseException:
        paths.frozen_weights(accelerator.process_index).unlink(missing_ok=True)
        if progress is None and accelerator.is_main_process and not paths.checkpoint_dir.exists():
            shutil.rmtree(paths.root, ignore_errors=True)  # nothing worth keeping: leave no half-run behind
        raise
    finally:
        if trackers:
            accelerator.end_training()


Setting = TypeVar("Setting")


def preset_filled(value: Setting | None, name: str) -> Setting:
    """A setting the task's preset fills when the user leaves it out (``config.with_preset``)."""
    if value is None:
        raise VisionLoraError(f"{name} is not set, and the task's preset gives none")
    return value


def _train_in(paths: RunPaths, cfg: TrainConfig, task: Task, accelerator, progress: Progress | None, facts: RunFacts):
    # -- data and model -----------------------------------------------------------------
    source, model, processor, info, data = build_run(paths, cfg, task, accelerator, facts)
    adapter = facts.adapter
    if cfg.init_from and progress is None:
        facts.initial_metrics = _evaluate_once(task, model, processor, data.val, accelerator, info, cfg.batch_size)
        accelerator.print(f"starting from {cfg.init_from}: {task.main_metric} "
                          f"{facts.initial_metrics[task.main_metric]:.4f} before training")
    frozen = None
    if adapter is not None and facts.precision[0] == "bf16":
        frozen = FrozenOriginals(model, paths.frozen_weights(accelerator.process_index) if cfg.low_memory else None)

    # -- loop ---------------------------------------------------------------------------
    facts.lap("adapter")
    loop = TrainingLoop(cfg, task, info, processor, accelerator, model, data, paths)
    accelerator.print(loop.loading.describe())
    facts.lap("loop setup")
    facts.data_loading = loop.loading.to_dict()
    if progress is not None:
        loop.restore(progress)
        accelerator.print(f"resumed after epoch {progress.completed_epochs}, batch {progress.batches_done}")
    loop.run()
    facts.lap("epochs")
    model = unwrap_in_fp32(accelerator, loop.model)  # predictions and files in fp32
    if frozen is not None:
        frozen.restore(model)
    final = loop.final_evaluation(model)
    facts.final_metrics, facts.metrics_precision = final.metrics, loop.final_precision
    facts.test_metrics = loop.test_metrics(model)
    facts.base_revision = info.base_revision
    facts.lap("final evaluation")

    # -- artifacts ----------------------------------------------------------------------
    summary = None
    if accelerator.is_main_process:
        summary = save_run(paths, cfg, task, model, processor, info, source, facts, loop, final)
        accelerator.print(f"saved {paths.model_dir} and {paths.results_dir}")
    accelerator.wait_for_everyone()
    return RunResult(paths, summary, model, processor, info)


def build_run(paths: RunPaths, cfg: TrainConfig, task: Task, accelerator, facts: RunFacts):
    """(source, model, processor, info, datasets) of a run about to train, seeded as every run is: the
    data read, the model built and its adapter made, in this order, after ``set_seed(cfg.seed)``; the run's
    first lines printed. Packed jobs are built by the same function, so they start as they would alone."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    facts.lap("setup")
    source = task.data.read_data(cfg)
    facts.lap("data reading")
    model, processor, info = _starting_model(cfg, task, source.labels, facts)
    facts.lap("model load")
    data = facts.data = task.data.make_datasets(source, processor, info, cfg)
    facts.lap("data decoding")
    if data.cache is not None and cfg.cache == "auto" and data.cache.mode == "disk":
        accelerator.print(data.cache.reason)
    model, adapter = _with_adapter(model, processor, info, cfg, task, accelerator, paths)
    facts.parameters, facts.adapter = parameter_counts(model), adapter
    _announce(cfg, data, facts, adapter, accelerator, paths)
    return source, model, processor, info, data


def _starting_model(cfg: TrainConfig, task: Task, labels: list[str], facts: RunFacts):
    """(model, processor, info) to train: the finished run of ``--init-from``, or ``--model`` for ``labels``."""
    if cfg.init_from:
        model, processor, info, facts.init_from = start_from_run(cfg.init_from, task, labels, cfg.mode)
        cfg.model = info.base_model if cfg.mode == "lora" else str(Path(cfg.init_from) / "trained_model")
    else:
        model, processor, info = task.model.build_model(preset_filled(cfg.model, "--model"), labels, cfg.image_size,
                                                        cfg.mode)
    facts.base_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return model, processor, info


def _with_adapter(model, processor, info: ModelInfo, cfg: TrainConfig, task: Task, accelerator, paths: RunPaths):
    """(model, its adapter's setup or None): in LoRA mode the model with a fresh adapter (a built-in
    base saved with the run first), or the adapter an ``--init-from`` run continues."""
    if cfg.mode != "lora":
        return model, None
    if hasattr(model, "peft_config"):  # an adapter continued from --init-from
        return model, described_adapter(model)
    if is_builtin(preset_filled(cfg.model, "--model")):
        if accelerator.is_main_process and not paths.base_dir.exists():
            save_model(model, processor, info.to_dict(), paths.base_dir)
        accelerator.wait_for_everyone()
        info.base_revision = base_revision(str(paths.base_dir))
    return apply_adapter(model, preset_filled(cfg.lora_r, "--lora-r"), preset_filled(cfg.lora_alpha, "--lora-alpha"),
                         cfg.lora_dropout, preset_filled(cfg.target_modules, "--target-modules"),
                         task.model.head_modules(model), cfg.method)


def _announce(cfg: TrainConfig, data: Datasets, facts: RunFacts, adapter, accelerator, paths: RunPaths) -> None:
    """The run's first lines: data, parameters and targets, precision, and the data's notes."""
    targets = adapter.resolved["target_modules"] if adapter else None
    accelerator.print(describe_start(cfg, data.counts, len(data.skipped), facts.parameters, targets, paths.root))
    accelerator.print(f"precision {facts.precision[0].replace('no', 'fp32')} ({facts.precision[1]})")
    for note in data.description.get("notes", []):
        accelerator.print(f"note: {note}")


def save_run(paths: RunPaths, cfg: TrainConfig, task: Task, model, processor, info: ModelInfo, source,
             facts: RunFacts, loop: Any, final: Evaluation, adapter: str = "default") -> dict:
    """Write the trained model (of a peft model, its adapter ``adapter``), the diagnostics and the results
    (summary last); drop the checkpoints. ``loop`` has the run's ``data``, ``state`` and ``early_stopped``."""
    if cfg.mode == "lora" and is_builtin(preset_filled(cfg.model, "--model")):
        model.peft_config[adapter].base_model_name_or_path = str(paths.base_dir.resolve())
    save_model(model, processor, info.to_dict(), paths.model_dir, adapter)
    facts.lap("model saving")
    if cfg.figures:
        write_diagnostics(task, model, processor, loop.data.val, source.val, info, paths, final)
        facts.lap("diagnostics")
    summary = write_results(paths, task, info, facts, loop.state, loop.early_stopped)
    shutil.rmtree(paths.checkpoint_dir, ignore_errors=True)
    return summary


class FrozenOriginals:
    """A LoRA model trains under bf16 with its frozen layer weights stored in bf16 (the same results, less
    memory, no cast at every step); their full-precision originals wait in host memory, or with
    ``--low-memory`` in ``file``, until training ends and ``restore`` puts them back."""

    def __init__(self, model, file: Path | None):
        from safetensors.torch import save_file

        self.originals = lower_frozen_weights(model, torch.bfloat16)
        self.file = file if self.originals and file is not None else None
        if self.file is not None:
            save_file({k: v.contiguous() for k, v in self.originals.items()}, str(self.file))
            self.originals = {}

    @contextlib.contextmanager
    def in_full_precision(self, model) -> Iterator[None]:
        """The originals (kept in memory) in ``model`` for a while, then the bf16 weights back: a packed job's
        passes and files at its end, while the others go on training."""
        lowered = {name: model.get_parameter(name) for name in self.originals}
        restore_weights(model, {name: t.to(lowered[name].device) for name, t in self.originals.items()})
        try:
            yield
        finally:
            restore_weights(model, lowered)

    def restore(self, model) -> None:
        """Each original back, on the device its lowered weight is on now (the accelerator's), one at a time."""
        from safetensors import safe_open

        for name, original in self.originals.items():
            restore_weights(model, {name: original.to(model.get_parameter(name).device)})
        self.originals = {}
        if self.file is None or not self.file.is_file():
            return
        with safe_open(str(self.file), framework="pt") as originals:
            for name in originals.keys():
                restore_weights(model, {name: originals.get_tensor(name).to(model.get_parameter(name).device)})
        self.file.unlink()


def _evaluate_once(task: Task, model, processor, dataset, accelerator, info: ModelInfo, batch_size: int):
    """Metrics of ``model`` as it is (fp32, before any training step), on the device training runs on."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=task.steps.collate)
    model.to(accelerator.device)
    return evaluate(task, model, processor, accelerator.prepare(loader), accelerator, info)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The model's trainable weights with weight decay; biases and norm weights (1-D tensors) without."""
    return grouped_parameters([p for p in model.parameters() if p.requires_grad], weight_decay)


def grouped_parameters(trainable: list[torch.nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """``trainable`` in AdamW's groups: weights with weight decay; biases and norm weights (1-D tensors) without."""
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def training_loaders(cfg: TrainConfig, task: Task, data: Datasets, accelerator, runs_here: int):
    """(the loader plan, the training loader, the validation loader) of a run, before ``prepare``;
    ``runs_here`` runs share this machine's cores (processes, or the jobs of a pack)."""
    loading = plan_loading(cfg.num_workers, accelerator.device,
                           int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)) * runs_here)
    accelerator.dataloader_config.non_blocking = loading.non_blocking  # read by prepare()
    # Loaders draw their worker seeds from their own generators, not the global RNG that
    # dropout uses, so a resumed run sees the same random numbers as an uninterrupted one.
    sampler = EpochWeightedSampler(task.data.sample_weights(data.train), cfg.seed) if cfg.balanced_sampler else None
    train_loader = loading.loader(
        data.train, task.steps.collate, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
        drop_last=False, generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = loading.loader(
        data.val, task.steps.collate, batch_size=cfg.batch_size, shuffle=False,
        generator=torch.Generator().manual_seed(cfg.seed))
    return loading, train_loader, val_loader


def held_out_metrics(loop: Any, model) -> dict[str, Any] | None:
    """The best weights' metrics on the held-out test part, in fp32: one pass, at the end (``loop`` has the
    run's ``task``, ``cfg``, ``data``, ``processor``, ``info``, ``accelerator`` and ``state``)."""
    if loop.data.test is None:
        return None
    loader = torch.utils.data.DataLoader(loop.data.test, batch_size=loop.cfg.batch_size,
                                         collate_fn=loop.task.steps.collate)
    metrics = evaluate(loop.task, model, loop.processor, loop.accelerator.prepare(loader), loop.accelerator,
                       loop.info)
    loop.accelerator.print(f"{loop.prefix}test {loop.task.main_metric} {metrics[loop.task.main_metric]:.4f} "
                           f"(best epoch {loop.state.best_epoch}, chosen on validation)")
    return metrics


class TrainingLoop:
    """Epochs of training and evaluation, keeping the best epoch's weights and checkpointing."""

    def __init__(self, cfg: TrainConfig, task: Task, info: ModelInfo, processor, accelerator, model, data: Datasets,
                 paths: RunPaths):
        self.cfg, self.task, self.info, self.processor = cfg, task, info, processor
        self.normalizer = Normalizer(processor)
        self.accelerator, self.data, self.paths = accelerator, data, paths
        self.loading, train_loader, val_loader = training_loaders(cfg, task, data, accelerator, 1)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.kept_names = {n for n, p in model.named_parameters() if p.requires_grad}
        self.kept_names |= {n for n, _ in model.named_buffers()}
        optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=preset_filled(cfg.lr, "--lr"))
        self.model, self.optimizer, self.train_loader, self.val_loader = accelerator.prepare(
            model, optimizer, train_loader, val_loader
        )
        self.scheduler = accelerator.prepare(self._schedule())
        self.state = Progress(config=cfg.to_dict())
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_evaluation: Evaluation | None = None  # the best epoch's pass, when this process made it
        self.final_precision = "fp32"  # the precision of the final evaluation's pass
        self.early_stopped = False
        self.tracking = bool(accelerator.trackers)
        self.prefix = ""  # before each line it prints

    def _schedule(self):
        from transformers import get_cosine_schedule_with_warmup

        steps_per_epoch = math.ceil(len(self.train_loader) / self.cfg.grad_accum)
        total = steps_per_epoch * self.cfg.epochs
        if self.cfg.max_steps:
            total = min(total, self.cfg.max_steps)
        total *= self.accelerator.num_processes
        return get_cosine_schedule_with_warmup(self.optimizer, round(total * self.cfg.warmup_ratio), total)

    def run(self) -> list[dict[str, Any]]:
        state = self.state
        for epoch in range(state.completed_epochs + 1, self.cfg.epochs + 1):
            row = {"epoch": epoch, "train_loss": self._train_epoch(epoch), "lr": self.scheduler.get_last_lr()[0]}
            evaluation = evaluate_outputs(self.task, self.model, self.processor, self.val_loader, self.accelerator,
                                          self.info)
            metrics = evaluation.metrics
            row.update({f"val_{k}": v for k, v in metrics.items()})
            row["seconds"] = round(time.perf_counter() - self._epoch_started, 3)
            state.history.append(row)
            if self.tracking:
                tracking.log_epoch(self.accelerator, row, state.global_step)
            improved = self._track_best(epoch, metrics)
            self.best_evaluation = evaluation if improved else self.best_evaluation
            state.stale_epochs = 0 if improved else state.stale_epochs + 1
            state.completed_epochs, state.batches_done, state.loss_total = epoch, 0, 0.0
            self.accelerator.print(describe_epoch(row, self.cfg.epochs, self.task.main_metric, improved))
            stop = bool(self.cfg.patience and state.stale_epochs >= self.cfg.patience)
            if self._steps_done():
                self.accelerator.print(f"stopped after --max-steps {self.cfg.max_steps} optimizer steps")
                break
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

        state, device = self.state, self.accelerator.device
        self._epoch_started = time.perf_counter()
        self.model.train()
        self.task.model.prepare_for_training(self.model, self.cfg.mode)
        if hasattr(self.data.train, "set_epoch"):
            self.data.train.set_epoch(epoch)
        self.train_loader.set_epoch(epoch)
        skipped = state.batches_done
        # Kept on the device: the epoch's loss sum, the batch counter, and the first non-finite loss.
        self._loss_sum = torch.tensor(state.loss_total, device=device)
        self._batch = torch.tensor(skipped, device=device)
        self._bad_batch = torch.tensor(-1, device=device)
        self._bad_loss = torch.tensor(0.0, device=device)
        loader = skip_first_batches(self.train_loader, skipped) if skipped else self.train_loader
        show = self.cfg.progress and self.accelerator.is_local_main_process
        bar = tqdm(loader, desc=f"epoch {epoch}/{self.cfg.epochs}", leave=False, disable=not show,
                   initial=skipped, total=len(self.train_loader))
        for batch in bar:
            batch = self.task.steps.device_batch(batch, self.normalizer)
            with self.accelerator.accumulate(self.model):
                loss = self.task.steps.loss(self.model, batch, self.info)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients and self.cfg.grad_clip > 0:
                    self.accelerator.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            self._note_loss(loss.detach().float())
            state.batches_done += 1
            state.images_seen += len(batch["pixel_values"]) * self.accelerator.num_processes
            if show and state.batches_done % PROGRESS_EVERY == 0:
                bar.set_postfix(loss=f"{float(self._loss_sum) / state.batches_done:.4f}")
            if self.accelerator.sync_gradients:
                state.global_step += 1
                if self.tracking:  # a host sync per step, only when a tracker asks for the per-step loss
                    tracking.log_step(self.accelerator, float(loss), self.scheduler.get_last_lr()[0], state.global_step)
                if self._steps_done():
                    break
                last = state.batches_done == len(self.train_loader)
                if self.cfg.save_every and state.global_step % self.cfg.save_every == 0 and not last:
                    self._check_finite(epoch)
                    state.train_seconds += time.perf_counter() - self._epoch_started
                    self._epoch_started = time.perf_counter()
                    self._save_checkpoint()
        self._check_finite(epoch)
        state.train_seconds += time.perf_counter() - self._epoch_started
        mean = torch.tensor([state.loss_total / max(state.batches_done, 1)], device=device)
        return float(self.accelerator.reduce(mean, reduction="mean"))

    def _steps_done(self) -> bool:
        """Whether --max-steps optimizer steps have been taken."""
        return self.cfg.max_steps is not None and 0 < self.cfg.max_steps <= self.state.global_step

    def _note_loss(self, loss: torch.Tensor) -> None:
        """Add the batch's loss to the epoch's sum and remember the first non-finite one, without a host sync."""
        self._batch += 1
        first_bad = (self._bad_batch < 0) & ~torch.isfinite(loss)
        self._bad_batch = torch.where(first_bad, self._batch, self._bad_batch)
        self._bad_loss = torch.where(first_bad, loss, self._bad_loss)
        self._loss_sum += loss

    def _check_finite(self, epoch: int) -> None:
        """Stop with a message if a loss since the last check was not finite; else record the sum."""
        bad_batch = int(self._bad_batch)
        if bad_batch >= 0:
            if self.paths.checkpoint_dir.exists():
                kept = f"the last good checkpoint is kept in {self.paths.checkpoint_dir}"
            else:
                kept = "no checkpoint was saved yet"
            raise VisionLoraError(
                f"training diverged: loss is {float(self._bad_loss)} at epoch {epoch}, batch {bad_batch}; "
                f"{kept}; try a lower --lr"
            )
        self.state.loss_total = float(self._loss_sum)

    def _trained_weights(self) -> dict[str, torch.Tensor]:
        """A copy of the trained weights and the buffers, on the CPU: no second copy in the accelerator's memory;
        named as checkpoints name them."""
        model = self.accelerator.unwrap_model(self.model)
        return {self.saved_name(name): t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()
                if name in self.kept_names}

    def saved_name(self, name: str) -> str:
        """A weight's name in checkpoints and kept best weights (hook: a packed job saves its slot's weights
        under the names a run alone gives them, so either resumes the other's checkpoint)."""
        return name

    def model_name(self, name: str) -> str:
        """The model's name of a weight named as checkpoints name it (the inverse of ``saved_name``)."""
        return name

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        model = self.accelerator.unwrap_model(self.model)
        model.load_state_dict({self.model_name(name): t for name, t in weights.items()}, strict=False)

    def _track_best(self, epoch: int, metrics: dict[str, Any]) -> bool:
        value = metrics[self.task.main_metric]
        best = self.state.best_value
        better = best is None or (value > best if self.task.greater_is_better else value < best)
        if better:
            self.state.best_epoch, self.state.best_value, self.state.best_metrics = epoch, value, metrics
            self.best_state = self._trained_weights()
        return better

    def final_evaluation(self, model) -> Evaluation:
        """The best epoch's validation pass, in the precision the run trained in: a run reports the metrics it
        chose its best epoch by, as the field's trainers do (``visionlora evaluate RUN --precision P``
        reproduces them). A pass of the best weights in fp32 when this process did not make that pass (a
        run resumed after its best epoch). Its outputs feed the diagnostics; ``final_precision`` says which."""
        if self.best_evaluation is not None:
            self.final_precision = self.accelerator.mixed_precision.replace("no", "fp32")
            return self.best_evaluation
        self.final_precision = "fp32"
        return evaluate_outputs(self.task, model, self.processor, self.val_loader, self.accelerator, self.info)

    def test_metrics(self, model) -> dict[str, Any] | None:
        return held_out_metrics(self, model)

    def _restore_best(self) -> None:
        if self.best_state is not None:
            self._load_weights(self.best_state)

    # -- checkpoints --------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        if self.accelerator.is_main_process:
            save_checkpoint(self.paths, self._trained_weights(), self.best_state, self.optimizer, self.scheduler,
                            self.state)
        self.accelerator.wait_for_everyone()

    def restore(self, progress: Progress) -> None:
        """Continue from the checkpoint whose progress is ``progress``."""
        trained, best, state = load_checkpoint(self.paths)
        missing = {self.saved_name(name) for name in self.kept_names} - set(trained)
        if missing:
            raise VisionLoraError(f"{self.paths.checkpoint_dir}: checkpoint lacks {len(missing)} weights, "
                                  f"e.g. {sorted(missing)[0]}")
        self._load_weights(trained)
        self.optimizer.load_state_dict(state["optimizer"])
        scheduler = getattr(self.scheduler, "scheduler", self.scheduler)  # inside Accelerate's wrapper, if any
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            note = restore_cuda_rng(list(state["cuda_rng"]))
            if note:
                self.accelerator.print(f"note: {note}")
        self.state, self.best_state = progress, best
