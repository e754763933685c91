"""Packed training: several LoRA jobs over one shared base, every step's rows of all of them in one
forward and one backward.

As mLoRA's BatchLoRA does for language models: the frozen base runs once over the rows of every job in
the pack; each row goes through its own job's adapter (the gathered LoRA of ``modeling.mixed_batches``,
ranks padded with zeros) and its own job's head; each job's loss is taken from its own rows (the task's
``loss_of_outputs``), and their sum is backpropagated once. A job's weights get gradients from its own
rows only, so each job trains as it would alone:

- it is built by the same ``engine.build_run`` after the same ``set_seed``: the same initialisation;
- it reads its data through its own loaders, seeded as alone: the same order and augmentation;
- it has its own optimizer, learning-rate schedule, gradient clipping, evaluation, best epoch, early
  stopping and checkpoints (in its own run folder, as ``visionlora train`` writes them), and it leaves the
  pack when it finishes, at its own epoch.

What differs is rounding (other batch shapes, and the gathered update's order of operations) and the
random numbers of dropout, which the rows of all jobs draw from one generator.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from visionlora.artifacts import RunPaths, new_run_dir
from visionlora.config import TrainConfig
from visionlora.console import describe_epoch
from visionlora.data.transforms import Normalizer
from visionlora.deploy.evaluation import evaluate_outputs
from visionlora.errors import VisionLoraError
from visionlora.modeling.mixed_batches import mixed_rows, prepare_mixed_batches, select_rows
from visionlora.tasks.base import Task
from visionlora.training import DEFAULT_PACK_ROWS
from visionlora.training.checkpoint import Progress
from visionlora.training.engine import (
    FrozenOriginals,
    TrainingLoop,
    build_run,
    grouped_parameters,
    preset_filled,
    save_run,
    training_loaders,
)
from visionlora.training.results import RunFacts

BATCHNORM = torch.nn.modules.batchnorm._BatchNorm
# the settings that decide which batches a job reads: jobs equal in them share one data pipeline
BATCH_SETTINGS = ("task", "data", "val_data", "val_fraction", "seed", "batch_size", "augment", "balanced_sampler",
                  "image_size", "model", "revision", "cache")


@dataclass
class Job:
    """One adapter to train: its name (its run folder's) and its settings (``output`` is its run folder)."""

    name: str
    cfg: TrainConfig


@dataclass
class Outcome:
    """How a job ended: done, kept (finished before a resume), or failed (with the one-line reason)."""

    name: str
    status: str
    run_dir: str
    packed: bool = False
    why_alone: str | None = None  # why it did not train packed
    main_metric: str | None = None
    value: float | None = None
    seconds: float = 0.0
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # the run's final validation metrics


def rows_per_step(requested: int | None, device: torch.device) -> tuple[int, str]:
    """(the most rows of one packed step, why): ``--pack-rows`` as asked, or auto (None): up to 128 rows on
    a GPU, whose cores one job's batch leaves idle; one job's batch per step elsewhere, where one batch keeps
    the cores busy already and bigger steps only add memory traffic (a ViT-B/16 on 2 CPU cores trained
    3.7 images/s in steps of 128 rows, 7.9 in one job's batch of 16). A job's batch is never split."""
    if requested is not None:
        return requested, f"--pack-rows {requested}"
    if device.type == "cuda":
        return DEFAULT_PACK_ROWS, f"up to {DEFAULT_PACK_ROWS} rows per step on a GPU"
    return 1, f"one job's batch per step on {device.type}"


def packing_refusal(cfg: TrainConfig, task: Task) -> str | None:
    """Why a job with these settings cannot share a forward with other jobs, or None."""
    if cfg.mode != "lora":
        return "full fine-tuning trains the base itself, which packed jobs share"
    if cfg.method != "lora":
        return f"{cfg.method} adapters are not plain LoRA updates, which are what a shared forward gathers"
    if task.steps.packing_refusal:
        return task.steps.packing_refusal
    if cfg.grad_accum != 1:
        return "--grad-accum steps each job on its own count of batches"
    if cfg.mixed_precision == "fp16":
        return "fp16's loss scaling is one per model"
    if cfg.report_to != "none":
        return "--report-to logs one run per process"
    return None


def pack_key(cfg: TrainConfig, label_count: int) -> tuple:
    """Jobs with equal keys pack: one base and input size, one number of labels (the heads' output width),
    and the settings that say how the base is loaded and run."""
    return (cfg.task, cfg.model, cfg.revision, cfg.image_size, label_count, cfg.mixed_precision, cfg.device,
            cfg.allow_pickle, cfg.trust_remote_code)


def batchnorm_in_training(model: torch.nn.Module) -> str | None:
    """The first BatchNorm layer in training mode outside the heads (its batch statistics would mix the
    rows of several jobs), or None. A head's copies each see their own job's rows only."""
    from peft.utils.other import ModulesToSaveWrapper

    heads = [name for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
    for name, module in model.named_modules():
        if isinstance(module, BATCHNORM) and module.training and not any(name.startswith(h + ".") for h in heads):
            return name
    return None


def slot_name(job_name: str) -> str:
    """The adapter name of a job inside the shared model (peft keys cannot hold dots)."""
    return "job_" + re.sub(r"[^0-9A-Za-z_]", "_", job_name)


class PackedLane(TrainingLoop):
    """One job of a pack: its data, its slot of the shared model, optimizer, schedule and progress.

    It keeps ``TrainingLoop``'s bookkeeping (best epoch, checkpoints, resume, the finite-loss check),
    over its own slot's weights; the pack drives its steps.
    """

    def __init__(self, job: Job, task: Task, accelerator, shared, slot: str, built: tuple, facts: RunFacts,
                 pack_size: int = 1):
        self.job, self.slot, self.facts = job, slot, facts
        self.source, _, self.processor, self.info, self.data = built
        self.cfg, self.task, self.accelerator, self.paths = job.cfg, task, accelerator, RunPaths(
            Path(preset_filled(job.cfg.output, "--output")), "lora")
        self.normalizer = Normalizer(self.processor)
        self.prefix = f"[{job.name}] "
        accelerator.dataloader_config.data_seed = job.cfg.seed  # read by prepare() below, as alone
        # the pack's jobs share the cores: data workers are planned for each job's share of them
        self.loading, train_loader, val_loader = training_loaders(self.cfg, task, self.data, accelerator, pack_size)
        self.train_loader, self.val_loader = accelerator.prepare(train_loader, val_loader)
        self.model = shared
        own = {name: p for name, p in shared.named_parameters() if f".{slot}." in name}
        self.trainable = list(own.values())
        self.kept_names = set(own) | {name for name, _ in shared.named_buffers() if f".{slot}." in name}
        self.optimizer = torch.optim.AdamW(grouped_parameters(self.trainable, self.cfg.weight_decay),
                                           lr=preset_filled(self.cfg.lr, "--lr"))
        self.scheduler = self._schedule()
        self.state = Progress(config=self.cfg.to_dict())
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_evaluation = None
        self.final_precision = "fp32"
        self.early_stopped = self.tracking = False
        self.finished = self.in_epoch = False
        self._batches: Any = None
        self.data_key = tuple(getattr(self.cfg, name) for name in BATCH_SETTINGS)

    def saved_name(self, name: str) -> str:
        return name.replace(f".{self.slot}.", ".default.")

    def model_name(self, name: str) -> str:
        return name.replace(".default.", f".{self.slot}.")

    def begin_epoch(self) -> None:
        """Start (or, after a resume, continue) the next epoch: its augmentation, its counters and its clock."""
        epoch = self.state.completed_epochs + 1
        self._epoch_started = time.perf_counter()
        if hasattr(self.data.train, "set_epoch"):
            self.data.train.set_epoch(epoch)
        self.train_loader.set_epoch(epoch)
        device = self.accelerator.device
        self._loss_sum = torch.tensor(self.state.loss_total, device=device)
        self._batch = torch.tensor(self.state.batches_done, device=device)
        self._bad_batch = torch.tensor(-1, device=device)
        self._bad_loss = torch.tensor(0.0, device=device)
        self._batches = None
        self.in_epoch = True

    def epoch_over(self) -> bool:
        return self._steps_done() or self.state.batches_done >= len(self.train_loader)

    def batch_key(self) -> tuple:
        """Jobs with equal keys read the same batch here (the same data, settings that shape it, epoch and
        place in it): the pack reads it once and gives it to all of them, one data pipeline for many jobs."""
        return (self.data_key, self.state.completed_epochs + 1, self.state.batches_done)

    def fetch(self) -> dict[str, Any]:
        """Read the epoch's next batch from this job's own loader, model-ready (a job that was given its
        batches by another opens its loader where it stands)."""
        from accelerate import skip_first_batches

        if self._batches is None:
            done = self.state.batches_done
            self._batches = iter(skip_first_batches(self.train_loader, done) if done else self.train_loader)
        return self.task.steps.device_batch(next(self._batches), self.normalizer)

    def take_step(self, loss: torch.Tensor, images: int, seconds: float) -> None:
        """Clip, step and schedule this job's weights after the pack's backward; count the step."""
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._note_loss(loss.detach().float())
        state = self.state
        state.batches_done += 1
        state.images_seen += images
        state.global_step += 1
        state.train_seconds += seconds
        last = state.batches_done == len(self.train_loader)
        if self.cfg.save_every and state.global_step % self.cfg.save_every == 0 and not last:
            self._check_finite(state.completed_epochs + 1)
            self._save_checkpoint()

    def end_epoch(self) -> bool:
        """Evaluate this job after its epoch, keep its best, checkpoint; whether the job is finished."""
        state, epoch = self.state, self.state.completed_epochs + 1
        self._check_finite(epoch)
        row = {"epoch": epoch, "train_loss": state.loss_total / max(state.batches_done, 1),
               "lr": self.scheduler.get_last_lr()[0]}
        with self.accelerator.autocast():
            evaluation = evaluate_outputs(self.task, self.active(), self.processor, self.val_loader,
                                          self.accelerator, self.info)
        metrics = evaluation.metrics
        row.update({f"val_{k}": v for k, v in metrics.items()})
        row["seconds"] = round(time.perf_counter() - self._epoch_started, 3)
        state.history.append(row)
        improved = self._track_best(epoch, metrics)
        self.best_evaluation = evaluation if improved else self.best_evaluation
        state.stale_epochs = 0 if improved else state.stale_epochs + 1
        state.completed_epochs, state.batches_done, state.loss_total = epoch, 0, 0.0
        self._batches, self.in_epoch = None, False
        self.accelerator.print(self.prefix + describe_epoch(row, self.cfg.epochs, self.task.main_metric, improved))
        self.early_stopped = bool(self.cfg.patience and state.stale_epochs >= self.cfg.patience)
        if self.early_stopped:
            self.accelerator.print(f"{self.prefix}early stop: no better {self.task.main_metric} "
                                   f"for {state.stale_epochs} epochs")
        if self._steps_done():
            self.accelerator.print(f"{self.prefix}stopped after --max-steps {self.cfg.max_steps} optimizer steps")
        done = epoch >= self.cfg.epochs or self.early_stopped or self._steps_done()
        if not done:
            self._save_checkpoint()
        return done

    def active(self):
        """The shared model with this job's adapter and head active (in eval mode, for a whole-batch pass)."""
        self.model.set_adapter(self.slot)
        return self.model

    def finish(self) -> dict[str, Any]:
        """The best epoch's weights back in the slot, its final evaluation, and the run folder written."""
        self._restore_best()
        model = self.active()
        final = self.final_evaluation(model)
        self.facts.final_metrics, self.facts.metrics_precision = final.metrics, self.final_precision
        self.facts.test_metrics = self.test_metrics(model)
        self.facts.base_revision = self.info.base_revision
        self.facts.data_loading = self.loading.to_dict()
        summary = save_run(self.paths, self.cfg, self.task, model, self.processor, self.info, self.source,
                           self.facts, self, final, adapter=self.slot)
        self.finished = True
        return summary


class Pack:
    """Jobs that share a base, trained together; each leaves when it finishes."""

    def __init__(self, task: Task, accelerator, precision: tuple[str, str], max_rows: int = DEFAULT_PACK_ROWS,
                 size: int = 1):
        self.task, self.accelerator, self.precision, self.max_rows = task, accelerator, precision, max_rows
        self.size = size  # how many jobs it will hold
        self.shared: Any = None
        self.lanes: list[PackedLane] = []
        self.all_lanes: list[PackedLane] = []
        self.outcomes: list[Outcome] = []
        self.stats: dict[str, Any] = {}  # what the packed steps did, once run
        self.frozen: FrozenOriginals | None = None  # under bf16, the shared base's fp32 frozen weights

    def add(self, job: Job, progress: Progress | None) -> None:
        """Build ``job`` as it would be built alone and give it a slot in the shared model (its starting
        weights copied in, or its checkpoint's when ``progress`` says it resumes)."""
        cfg = job.cfg
        paths = RunPaths(Path(preset_filled(cfg.output, "--output")), "lora")
        if progress is None:
            new_run_dir(cfg.task, cfg.mode, cfg.output, overwrite=True)
        facts = RunFacts(cfg, self.precision, time.perf_counter())
        built = build_run(paths, cfg, self.task, self.accelerator, facts)
        own_model = built[1]
        if self.shared is None:
            self._share(own_model)
        slot = slot_name(job.name)
        self._add_slot(slot, own_model)
        lane = PackedLane(job, self.task, self.accelerator, self.shared, slot, built, facts, self.size)
        if progress is not None:
            lane.restore(progress)
            self.accelerator.print(f"{lane.prefix}resumed after epoch {progress.completed_epochs}, "
                                   f"batch {progress.batches_done}")
        self.lanes.append(lane)
        self.all_lanes.append(lane)

    def _share(self, model) -> None:
        """Make ``model`` (the first job's, with its adapter) the pack's shared base, on the device."""
        self.shared = model.to(self.accelerator.device)
        self.shared.train()
        self.task.model.prepare_for_training(self.shared, "lora")
        mixing = batchnorm_in_training(self.shared)
        if mixing:
            raise PackRefused(f"{mixing} is a BatchNorm layer in training mode: its batch statistics would mix "
                              f"the rows of several jobs")

    def _add_slot(self, slot: str, own_model) -> None:
        """A new adapter ``slot`` in the shared model, holding the starting weights of ``own_model``'s
        (default) adapter and head."""
        from copy import deepcopy

        self.shared.add_adapter(slot, deepcopy(own_model.peft_config["default"]))
        prepare_mixed_batches(self.shared)
        starting = {name.replace(".default.", f".{slot}."): p.detach()
                    for name, p in own_model.named_parameters() if p.requires_grad}
        starting |= {name.replace(".default.", f".{slot}."): b.detach()
                     for name, b in own_model.named_buffers() if ".default." in name}
        targets = dict(self.shared.named_parameters()) | dict(self.shared.named_buffers())
        missing = sorted(set(starting) - set(targets))
        if missing:
            raise VisionLoraError(f"packing: the shared model has no {missing[0]} for the job's adapter")
        with torch.no_grad():
            for name, tensor in starting.items():
                targets[name].copy_(tensor.to(targets[name].device))

    def run(self) -> list[Outcome]:
        """Train until every job has finished or failed; print what the packed steps did."""
        if not self.lanes:
            return self.outcomes
        self._training_mode()
        if self.precision[0] == "bf16":  # as a run alone stores them, once every job's weights are trainable
            self.frozen = FrozenOriginals(self.shared, None)
        steps, images, seconds = 0, 0, 0.0
        while self.lanes:
            for group in row_groups(self._next_batches(), self.max_rows):
                started = time.perf_counter()
                images += self._packed_step(group)
                seconds += time.perf_counter() - started
                steps += 1
        self.stats = {"jobs": [lane.job.name for lane in self.all_lanes], "steps": steps, "images": images,
                      "step_seconds": round(seconds, 3), "images_per_second": round(images / max(seconds, 1e-9), 2)}
        self.accelerator.print(f"packed steps: {steps} in {seconds:.1f}s, {self.stats['images_per_second']:.1f} "
                               f"images/s")
        return self.outcomes

    def _next_batches(self) -> list[tuple[PackedLane, dict[str, Any]]]:
        """Each job's next batch (read once for the jobs that read the same one); a job whose epoch ended is
        evaluated first, and one that finished leaves."""
        ready, served = [], {}
        for lane in list(self.lanes):
            try:
                if not lane.in_epoch:
                    lane.begin_epoch()
                if lane.epoch_over():
                    if lane.end_epoch():
                        self._leave(lane, self._finish(lane))
                        continue
                    self._training_mode()
                    lane.begin_epoch()
                key = lane.batch_key()
                if key not in served:
                    served[key] = lane.fetch()
            except VisionLoraError as err:
                self._fail(lane, str(err))
                continue
            ready.append((lane, served[key]))
        return ready

    def _finish(self, lane: PackedLane) -> dict[str, Any]:
        """``lane.finish()`` over the base in full precision, as a run alone finishes."""
        if self.frozen is None:
            return lane.finish()
        with self.frozen.in_full_precision(self.shared):
            return lane.finish()

    def _packed_step(self, ready: list[tuple[PackedLane, dict[str, Any]]]) -> int:
        """One forward over every job's rows, each row with its job's adapter and head; one backward of the
        jobs' summed losses; then each job's own optimizer step. Returns the rows."""
        from accelerate.utils import convert_to_fp32

        started = time.perf_counter()
        sizes = [len(batch["pixel_values"]) for _, batch in ready]
        pixels = torch.cat([batch["pixel_values"] for _, batch in ready])
        names = [lane.slot for (lane, _), size in zip(ready, sizes) for _ in range(size)]
        with self.accelerator.autocast(), mixed_rows(self.shared, names):
            outputs = self.task.steps.forward(self.shared, {"pixel_values": pixels}, ready[0][0].info)
        outputs = convert_to_fp32(outputs)
        losses, start = [], 0
        for (lane, batch), size in zip(ready, sizes):
            rows = torch.arange(start, start + size, device=pixels.device)
            losses.append(self.task.steps.loss_of_outputs(select_rows(outputs, rows, len(names)), batch, lane.info))
            start += size
        torch.stack(losses).sum().backward()
        seconds = time.perf_counter() - started
        for (lane, _), loss, size in zip(ready, losses, sizes):
            lane.take_step(loss, size, seconds)
        return len(names)

    def _training_mode(self) -> None:
        """Every training job's weights trainable, the model in training mode (after an evaluation, which
        makes one adapter active)."""
        self.shared.train()
        self.task.model.prepare_for_training(self.shared, "lora")
        for lane in self.lanes:
            for param in lane.trainable:
                param.requires_grad_(True)

    def _leave(self, lane: PackedLane, summary: dict[str, Any]) -> None:
        self.lanes.remove(lane)
        for param in lane.trainable:
            param.requires_grad_(False)
        main = summary["main_metric"]
        self.outcomes.append(Outcome(lane.job.name, "done", str(lane.paths.root), packed=True, main_metric=main,
                                     value=summary["metrics"][main], seconds=time.perf_counter() - lane.facts.started,
                                     metrics=summary["metrics"]))
        self._training_mode()

    def _fail(self, lane: PackedLane, reason: str) -> None:
        self.lanes.remove(lane)
        for param in lane.trainable:
            param.requires_grad_(False)
        self.accelerator.print(f"error: {lane.job.name}: {reason}")
        if not lane.paths.checkpoint_dir.exists():
            shutil.rmtree(lane.paths.root, ignore_errors=True)
        self.outcomes.append(Outcome(lane.job.name, "failed", str(lane.paths.root), packed=True, error=reason))
        self._training_mode()


def row_groups(ready: list[tuple[PackedLane, dict[str, Any]]], max_rows: int) -> list[list]:
    """The jobs' batches in groups of at most ``max_rows`` rows (a job's batch is never split), each group
    one packed step: a pack of many jobs steps all of them without holding all their activations at once."""
    groups: list[list] = []
    rows = max_rows
    for lane, batch in ready:
        size = len(batch["pixel_values"])
        if rows + size > max_rows:
            groups.append([])
            rows = 0
        groups[-1].append((lane, batch))
        rows += size
    return groups


class PackRefused(VisionLoraError):
    """The base cannot be shared by several jobs (seen once it is built); the jobs then train one by one."""
