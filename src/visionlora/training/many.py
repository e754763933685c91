"""``visionlora train-many``: many adapters trained in one process, packed over one base where they can be.

Jobs come from the subfolders of one folder (one dataset each) or from a YAML list; each gets a run
folder under the output folder, laid out as ``visionlora train`` lays one out. Jobs that share a base,
task, input size, label count and a packable method train packed (``training.packing``); the others
train one after another. One job's bad data fails that job alone; the final table and ``jobs.csv``
say how each ended, and whether it trained packed (or why not).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

from visionlora.artifacts import RunPaths, atomic_write_bytes, atomic_write_json, read_json, rows_csv
from visionlora.config import TrainConfig, build_config, with_preset
from visionlora.console import library_messages_to
from visionlora.errors import VisionLoraError
from visionlora.modeling.loading import loading_policy
from visionlora.runtime import (
    accelerator_settings,
    new_accelerator,
    pick_device,
    reset_peak_memory,
    resolve_precision_on,
)
from visionlora.tasks import get_task
from visionlora.training.checkpoint import Progress, read_progress
from visionlora.training.engine import resume, train
from visionlora.training.packing import Job, Outcome, Pack, PackRefused, pack_key, packing_refusal, rows_per_step

PLAN_FILE = "train-many.json"  # the jobs and their settings, for --resume
JOBS_CSV = "jobs.csv"
PACKING_FILE = "packing.json"  # each pack's jobs, steps, images and step seconds
LOG_FILE = "train-many.log"

Say = Callable[[str], None]


# -- jobs ------------------------------------------------------------------------------------------
def jobs_from_folders(root: str | Path) -> list[dict[str, Any]]:
    """One job per subfolder of ``root`` (hidden ones skipped), named after it, its data that folder."""
    root = Path(root)
    if not root.is_dir():
        raise VisionLoraError(f"--data-each {root}: not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise VisionLoraError(f"--data-each {root}: no subfolders (one dataset per subfolder)")
    return [{"name": folder.name, "data": str(folder)} for folder in folders]


def jobs_from_yaml(path: str | Path) -> list[dict[str, Any]]:
    """The jobs of a YAML file: a list (or ``jobs:`` list) of mappings, each with ``name`` and any
    ``train`` setting (``data`` at least, unless every job shares it)."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise VisionLoraError(f"--jobs {path}: file not found") from None
    except yaml.YAMLError:
        raise VisionLoraError(f"--jobs {path}: not valid YAML") from None
    entries = raw.get("jobs") if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries:
        raise VisionLoraError(f"--jobs {path}: expected a list of jobs (each a mapping with a name)")
    jobs = []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or not entry.get("name"):
            raise VisionLoraError(f"--jobs {path}: job {number} is not a mapping with a name")
        jobs.append({str(k).replace("-", "_"): v for k, v in entry.items()})
    return jobs


def plan_jobs(specs: list[dict[str, Any]], shared_yaml: dict[str, Any], shared_flags: dict[str, Any],
              output: Path) -> tuple[list[Job], list[Outcome]]:
    """Each job's settings (the job's own over the shared flags over the shared YAML over the preset),
    its run folder ``output/<name>``; a job whose settings are wrong is a failed outcome, not an error."""
    names = [str(spec["name"]) for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise VisionLoraError(f"job names must differ; repeated: {', '.join(repeated)}")
    jobs, failed = [], []
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    for spec in specs:
        name = str(spec["name"])
        unknown = sorted(set(spec) - known - {"name"})
        try:
            if unknown:
                raise VisionLoraError(f"unknown setting {unknown[0]!r}")
            own = {k: v for k, v in spec.items() if k != "name"}
            cfg = build_config(shared_yaml, {**shared_flags, **own, "output": str(output / name)})
        except VisionLoraError as err:
            failed.append(Outcome(name, "failed", str(output / name), error=str(err)))
            continue
        jobs.append(Job(name, cfg))
    return jobs, failed


PATH_SETTINGS = ("data", "val_data", "test_data", "init_from", "model", "cache_dir", "output")


def with_absolute_paths(job: Job) -> Job:
    """``job`` with the paths among its settings made absolute, for workers that run in other folders
    (a Ray worker runs in its trial's folder)."""
    changes: dict[str, Any] = {}
    for name in PATH_SETTINGS:
        value = getattr(job.cfg, name)
        if value and (name == "output" or Path(value).exists()):
            changes[name] = str(Path(value).resolve())
    return Job(job.name, dataclasses.replace(job.cfg, **changes))


def save_plan(output: Path, jobs: list[Job]) -> None:
    atomic_write_json(output / PLAN_FILE, {"jobs": [{"name": job.name, "settings": job.cfg.to_dict()}
                                                    for job in jobs]})


def load_plan(output: Path) -> list[Job]:
    """The jobs a ``train-many`` into ``output`` started with (for ``--resume``)."""
    path = output / PLAN_FILE
    if not path.is_file():
        raise VisionLoraError(f"{output}: nothing to resume (no {PLAN_FILE}; was it made by train-many?)")
    return [Job(entry["name"], TrainConfig.from_dict(entry["settings"])) for entry in read_json(path)["jobs"]]


# -- running ---------------------------------------------------------------------------------------
def train_many(jobs: list[Job], output: Path, say: Say = print, resuming: bool = False,
               pack_rows: int | None = None) -> list[Outcome]:
    """Train every job: those that pack, packed, pack by pack (``pack_rows`` rows per step at most, None:
    auto, ``packing.rows_per_step``); the rest one after another; finished runs are kept when ``resuming``.
    Returns one outcome per job."""
    output.mkdir(parents=True, exist_ok=True)
    if not resuming:
        save_plan(output, jobs)
    outcomes: list[Outcome] = []
    pending = []
    for job in jobs:
        try:
            job = Job(job.name, with_preset(job.cfg).validate())
        except VisionLoraError as err:
            outcomes.append(Outcome(job.name, "failed", str(job.cfg.output), error=str(err)))
            continue
        kept = _kept(job) if resuming else None
        if kept:
            outcomes.append(kept)
        else:
            pending.append(job)
    packs, alone = group_jobs(pending, outcomes)
    for pack_jobs in packs:
        refused = _train_pack(pack_jobs, output, say, outcomes, pack_rows)
        alone += [(job, refused) for job in refused_jobs(pack_jobs, outcomes)] if refused else []
    for job, why in alone:
        outcomes.append(_train_alone(job, why, say))
    order = {job.name: i for i, job in enumerate(jobs)}
    return sorted(outcomes, key=lambda outcome: order.get(outcome.name, len(order)))


def refused_jobs(jobs: list[Job], outcomes: list[Outcome]) -> list[Job]:
    """The jobs of a refused pack that have no outcome yet."""
    ended = {outcome.name for outcome in outcomes}
    return [job for job in jobs if job.name not in ended]


def group_jobs(jobs: list[Job], outcomes: list[Outcome]) -> tuple[list[list[Job]], list[tuple[Job, str]]]:
    """(packs of two or more jobs, jobs that train alone with the reason); a job whose data cannot be read
    is a failed outcome."""
    groups: dict[tuple, list[Job]] = {}
    alone: list[tuple[Job, str]] = []
    for job in jobs:
        task = get_task(job.cfg.task)
        refusal = packing_refusal(job.cfg, task)
        if refusal:
            alone.append((job, refusal))
            continue
        try:
            labels = task.data.read_data(job.cfg).labels
        except VisionLoraError as err:
            outcomes.append(Outcome(job.name, "failed", str(job.cfg.output), error=str(err)))
            continue
        groups.setdefault(pack_key(job.cfg, len(labels)), []).append(job)
    packs = [group for group in groups.values() if len(group) > 1]
    alone += [(group[0], "no other job shares its base, input size and label count")
              for group in groups.values() if len(group) == 1]
    return packs, alone


def _kept(job: Job) -> Outcome | None:
    """The outcome of a job whose run already finished (when resuming), else None."""
    paths = RunPaths(Path(str(job.cfg.output)), job.cfg.mode)
    if not paths.completed():
        return None
    summary = read_json(paths.summary)
    main = summary["main_metric"]
    return Outcome(job.name, "kept", str(paths.root), main_metric=main, value=summary["metrics"][main],
                   metrics=summary["metrics"])


def _checkpointed(job: Job) -> Progress | None:
    paths = RunPaths(Path(str(job.cfg.output)), job.cfg.mode)
    return read_progress(paths.root) if paths.progress_file.is_file() else None


def _train_pack(jobs: list[Job], output: Path, say: Say, outcomes: list[Outcome],
                pack_rows: int | None) -> str | None:
    """Train ``jobs`` packed, adding their outcomes; the reason when the base turned out not to pack."""
    cfg, task = jobs[0].cfg, get_task(jobs[0].cfg.task)
    device = pick_device(cfg.device)
    precision = resolve_precision_on(device, cfg.mixed_precision, task.fp16_unsafe)
    if precision[0] == "fp16":
        return "fp16's loss scaling is one per model"
    rows, rows_why = rows_per_step(pack_rows, device)
    say(f"packing {len(jobs)} jobs over {cfg.model} ({', '.join(job.name for job in jobs)}); "
        f"precision {precision[0].replace('no', 'fp32')} ({precision[1]}); {rows_why}")
    accelerator = _pack_accelerator(device, precision[0], cfg.seed, output)
    reset_peak_memory()
    pack = Pack(task, accelerator, precision, rows, len(jobs))
    with loading_policy(cfg.allow_pickle, cfg.trust_remote_code, cfg.revision), \
            library_messages_to(output / LOG_FILE):
        for job in jobs:
            try:
                pack.add(job, _checkpointed(job))
            except PackRefused as refused:
                say(f"not packed: {refused}")
                return str(refused)
            except VisionLoraError as err:
                say(f"error: {job.name}: {err}")
                outcomes.append(Outcome(job.name, "failed", str(job.cfg.output), packed=True, error=str(err)))
        outcomes += pack.run()
    _record_pack(output, pack.stats)
    return None


def _record_pack(output: Path, stats: dict[str, Any]) -> None:
    """Add a pack's step statistics to ``output/packing.json`` (one entry per pack)."""
    path = output / PACKING_FILE
    packs = read_json(path)["packs"] if path.is_file() else []
    atomic_write_json(path, {"packs": [*packs, stats]})


def _pack_accelerator(device, mixed_precision: str, seed: int, output: Path):
    from accelerate.utils import DataLoaderConfiguration

    return new_accelerator(**accelerator_settings(device), mixed_precision=mixed_precision, project_dir=str(output),
                           dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed))


def _train_alone(job: Job, why: str, say: Say) -> Outcome:
    """Train one job as ``visionlora train`` would, in this process (resuming its checkpoint if it has one)."""
    say(f"{job.name}: training alone ({why})")
    started = time.perf_counter()
    try:
        if _checkpointed(job) is not None:
            result = resume(str(job.cfg.output))
        else:
            result = train(dataclasses.replace(job.cfg, overwrite=True))
    except VisionLoraError as err:
        say(f"error: {job.name}: {err}")
        return Outcome(job.name, "failed", str(job.cfg.output), why_alone=why, error=str(err))
    summary = result.summary or {}
    main = summary.get("main_metric")
    return Outcome(job.name, "done", str(result.paths.root), why_alone=why, main_metric=main,
                   value=summary.get("metrics", {}).get(main), seconds=time.perf_counter() - started,
                   metrics=summary.get("metrics", {}))


# -- the table ----------------------------------------------------------------------------------
def outcome_rows(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    return [{"job": o.name, "status": o.status, "metric": o.main_metric or "",
             "value": "" if o.value is None else round(float(o.value), 4), "seconds": round(o.seconds, 1),
             "packed": "yes" if o.packed else "no", "note": o.error or o.why_alone or "", "run": o.run_dir}
            for o in outcomes]


def write_jobs_csv(output: Path, outcomes: list[Outcome]) -> Path:
    path = output / JOBS_CSV
    atomic_write_bytes(path, rows_csv(outcome_rows(outcomes)).encode())
    return path


def outcome_table(outcomes: list[Outcome]) -> str:
    """The final table: one row per job (its note cut to keep the row on one line)."""
    rows = outcome_rows(outcomes)
    columns = ["job", "status", "metric", "value", "seconds", "packed", "note"]
    cells = [[str(row[c])[:70] for c in columns] for row in rows]
    widths = [max(len(c), *(len(cell[i]) for cell in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)
