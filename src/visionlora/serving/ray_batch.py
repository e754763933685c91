"""Batch prediction over many images with Ray Data: ``visionlora predict RUN IMAGES --engine ray``.

Ray Data reads the images, decodes them (in CPU tasks of their own for actors on GPUs) and an
actor pool runs the models (``--actors``, ``--cpus-per-actor``, ``--gpus-per-actor``,
``--batch-size``, ``--decode``). Each image is predicted by
every run given, or by the run a list file names for it; runs over one base share one model in
each actor, their adapters mixed in one forward. Results stream to the output as they come:

- ``.jsonl``: one JSON object per line, appended;
- ``.parquet``: rows gather in ``OUTPUT.partial.jsonl`` and become the Parquet file at the end
  (lists and objects as JSON text).

An image that cannot be read is a row with an ``error`` field, counted at the end. Started again
with the same output, the job skips the (image, run) pairs already written.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from visionlora.deploy.runs import open_run, run_labels
from visionlora.errors import VisionLoraError
from visionlora.ray_cluster import join_cluster

DECODE_CPUS = 0.5  # less than an actor's, so Ray runs decoding in tasks of its own, not fused into the actors


@dataclass
class ActorPool:
    """The predicting actors: how many, each one's CPUs (its torch threads) and GPUs, images per batch."""

    actors: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    batch_size: int = 64
    decode: str = "auto"  # "tasks", "actors", or auto: tasks for actors on GPUs

    @property
    def decodes_apart(self) -> bool:
        """Actors on GPUs get decoded images from CPU tasks, so that the GPU never waits for decoding;
        actors on CPUs decode their own batches, which saves copying the pixels between processes
        (1.4x the images/s on 2 cores with a tiny model)."""
        return self.decode == "tasks" or (self.decode == "auto" and self.gpus > 0)

    def needed(self) -> dict[str, float]:
        """The CPUs and GPUs the job holds at once, decoding included."""
        decoding = DECODE_CPUS if self.decodes_apart else 0.0
        return {"cpus_needed": self.actors * self.cpus + decoding, "gpus_needed": self.actors * self.gpus}


@dataclass
class BatchJob:
    """What to predict: (image path, run name) pairs, the runs by name, and where the rows go."""

    items: list[tuple[str, str]]
    runs: dict[str, str]  # run name -> run folder
    output: Path
    options: dict[str, Any]


def plan_job(runs: list[str], images: list[str], output: str | Path, options: dict[str, Any]) -> BatchJob:
    """Every image by every run, or by the run named in a list file's ``run`` column; image paths made
    absolute (a list file's relative paths are taken from the current folder)."""
    named = run_labels([Path(run).resolve() for run in runs])
    output = Path(output)
    if output.suffix not in (".jsonl", ".parquet"):
        raise VisionLoraError(f"{output}: --engine ray writes .jsonl or .parquet")
    items: list[tuple[str, str]] = []
    for source in images:
        if Path(source).suffix.lower() in (".txt", ".csv"):
            items += _listed(Path(source), named)
        else:
            from visionlora.deploy.predictor import image_files

            items += [(str(path), name) for path in image_files([source]) for name in named]
    if not items:
        raise VisionLoraError(f"no image files found in: {' '.join(images)}")
    # absolute, so that actors on any node (in any working folder) find the files on shared storage
    items = [(str(Path(image).resolve()), run) for image, run in items]
    return BatchJob(items, named, output, options)


def predict_on_ray(runs: Sequence[str], images: Sequence[str], given: Mapping[str, Any], actors: int = 1,
                   cpus_per_actor: float = 1.0, gpus_per_actor: float | None = None, batch_size: int = 64,
                   decode: str = "auto", address: str | None = None) -> tuple[Path, dict[str, int]]:
    """``visionlora predict RUN IMAGES --engine ray``: every image by the ``runs`` (all of one task) on the
    Ray cluster at ``address`` (none: a local one, stopped at the end); (the output, :func:`run_job`'s counts).

    ``given`` holds the values of the task's declared options and writers, as the command line has
    them; of the writers only ``output`` is taken. ``gpus_per_actor`` None: 1 where the cluster has GPUs.
    """
    try:
        import ray
    except ImportError as err:
        raise VisionLoraError(f"--engine ray needs Ray Data ({err.name} is missing): "
                              "pip install 'visionlora[ray]'") from None
    if min(actors, batch_size) < 1 or cpus_per_actor <= 0:
        raise VisionLoraError("--actors and --batch-size must be at least 1, --cpus-per-actor above 0")
    job = _planned_job(list(runs), images, given)
    pool = ActorPool(actors, cpus_per_actor, gpus_per_actor or 0.0, batch_size, decode)
    join_cluster(address, pool.actors * pool.cpus + DECODE_CPUS)
    if gpus_per_actor is None and ray.cluster_resources().get("GPU", 0) > 0:
        pool.gpus = 1.0  # the cluster's GPUs, not this machine's: the actors may run elsewhere
    try:
        counts = run_job(job, pool)
    finally:
        ray.shutdown()
    return job.output, counts


def _planned_job(runs: list[str], images: Sequence[str], given: Mapping[str, Any]) -> BatchJob:
    """The job, once the runs are found to be of one task and only ``--output`` is asked for."""
    from visionlora.deploy.options import task_arguments

    tasks = {task.name: task for task in (open_run(run).task for run in runs)}
    if len(tasks) != 1:
        raise VisionLoraError(f"--runs: the runs are of different tasks ({', '.join(sorted(tasks))})")
    arguments = task_arguments(given, next(iter(tasks.values())), Path(runs[0]))
    if any(value is not None for value in arguments.box_values.values()) or set(arguments.outputs) - {"output"}:
        raise VisionLoraError("--engine ray writes --output FILE.jsonl or .parquet only (no boxes from a "
                              "detector, no drawn images or tables)")
    if "output" not in arguments.outputs:
        raise VisionLoraError("--engine ray needs --output FILE.jsonl or FILE.parquet")
    return plan_job(runs, list(images), arguments.outputs["output"], arguments.options)



def _listed(path: Path, runs: dict[str, str]) -> list[tuple[str, str]]:
    """A list file: one image path per line, or a CSV with an ``image`` column and an optional ``run`` one."""
    text = path.read_text().splitlines()
    if path.suffix.lower() == ".txt":
        return [(line.strip(), name) for line in text if line.strip() for name in runs]
    rows = list(csv.DictReader(text))
    if not rows or "image" not in rows[0]:
        raise VisionLoraError(f"{path}: a CSV list needs an 'image' column (and may have a 'run' column)")
    items = []
    for number, row in enumerate(rows, start=2):
        run = (row.get("run") or "").strip()
        if run and run not in runs:
            raise VisionLoraError(f"{path}, line {number}: run {run!r} is not one of the runs given "
                                  f"({', '.join(runs)})")
        items += [(row["image"].strip(), name) for name in ([run] if run else runs)]
    return items


def done_pairs(output: Path) -> set[tuple[str, str]]:
    """The (image, run) pairs an earlier start of the job wrote."""
    pairs: set[tuple[str, str]] = set()
    for rows in (_jsonl_rows(_journal(output)), _parquet_rows(output)):
        pairs |= {(row["image"], row["run"]) for row in rows}
    return pairs


def run_job(job: BatchJob, pool: ActorPool) -> dict[str, int]:
    """Predict ``job`` on the Ray cluster already joined; how many rows were written, skipped, failed."""
    import ray

    done = done_pairs(job.output)
    todo = [item for item in job.items if item not in done]
    counts = {"written": 0, "already_done": len(job.items) - len(todo), "errors": 0}
    if todo:
        _check_room(ray, pool)
        _quiet(ray.data.DataContext.get_current())
        records = [{"image": image, "run": run} for image, run in todo]
        dataset = ray.data.from_items(records, override_num_blocks=max(1, min(len(records) // pool.batch_size, 200)))
        decoded: ray.data.Dataset = dataset
        if pool.decodes_apart:
            decoded = dataset.map_batches(decode_images, batch_size=pool.batch_size, batch_format="pandas",
                                          num_cpus=DECODE_CPUS)
        predicted = decoded.map_batches(
            RunPredictor, fn_constructor_kwargs={"runs": job.runs, "options": job.options, "gpus": pool.gpus},
            batch_size=pool.batch_size, batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=pool.actors), num_cpus=pool.cpus, num_gpus=pool.gpus)
        journal = _journal(job.output) if job.output.suffix == ".parquet" else job.output
        journal.parent.mkdir(parents=True, exist_ok=True)
        _drop_cut_line(journal)
        with journal.open("a") as handle:
            for batch in predicted.iter_batches(batch_format="pandas", batch_size=None):
                handle.writelines(text + "\n" for text in batch["row"])
                counts["written"] += len(batch)
                counts["errors"] += int((batch["error"] != "").sum())
                handle.flush()
    if job.output.suffix == ".parquet" and _journal(job.output).is_file():
        _write_parquet(job.output)
    return counts


def _check_room(ray, pool: ActorPool) -> None:
    """Say when the cluster lacks the CPUs or GPUs the job needs, since Ray Data then waits without a word."""
    needed = pool.needed()
    for resource, amount in (("CPU", needed["cpus_needed"]), ("GPU", needed["gpus_needed"])):
        have, idle = ray.cluster_resources().get(resource, 0), ray.available_resources().get(resource, 0)
        if amount and idle < amount:
            print(f"the Ray cluster has {idle:g} of {have:g} {resource}s free and {pool.actors} actor(s) need "
                  f"{amount:g} (decoding included): the job waits until they are free or nodes join",
                  file=sys.stderr)


def decode_images(batch):
    """CPU task: each image file read and decoded to RGB pixels; an unreadable one carries its error."""
    from visionlora.data.images import UnreadableImage, load_rgb

    pixels, errors = [], []
    for path in batch["image"]:
        try:
            pixels.append(np.asarray(load_rgb(Path(path))))
            errors.append("")
        except (UnreadableImage, OSError) as err:
            pixels.append(np.zeros((1, 1, 3), np.uint8))
            errors.append(str(err) or type(err).__name__)
    batch["pixels"] = pixels
    batch["error"] = errors
    return batch


class RunPredictor:
    """An actor: the runs loaded once (adapters of one base on one model), predicting decoded images;
    on the CPU when it asked for no GPU (``gpus``), else on the GPU Ray gave it."""

    def __init__(self, runs: dict[str, str], options: dict[str, Any], gpus: float = 0.0):
        from visionlora.serving.models import ModelStore, device_for_gpus

        self.store = ModelStore(device_for_gpus(gpus), max_loaded=max(len(runs), 1))
        self.served = {name: self.store.add(name, folder) for name, folder in runs.items()}
        self.options = options

    def __call__(self, batch):
        from PIL import Image

        from visionlora.serving.models import predict_together

        if "pixels" not in batch:  # not decoded by a CPU task: see ActorPool.decodes_apart
            batch = decode_images(batch)
        rows = [""] * len(batch)
        good = [i for i, error in enumerate(batch["error"]) if not error]
        for i in set(range(len(batch))) - set(good):
            rows[i] = json.dumps({"image": batch["image"].iloc[i], "run": batch["run"].iloc[i],
                                  "error": batch["error"].iloc[i]})
        for group in self._groups(batch, good):
            images = [Image.fromarray(batch["pixels"].iloc[i]) for i in group]
            members = [self.served[batch["run"].iloc[i]] for i in group]
            for i, prediction in zip(group, predict_together(members, images, **self.options)):
                rows[i] = json.dumps({"image": batch["image"].iloc[i], "run": batch["run"].iloc[i], **prediction})
        return {"row": rows, "error": list(batch["error"])}

    def _groups(self, batch, rows: list[int]) -> Iterator[list[int]]:
        """Rows whose runs share a forward: mixing adapters of one base together, any other run alone."""
        groups: dict[tuple, list[int]] = {}
        for i in rows:
            served = self.served[batch["run"].iloc[i]]
            groups.setdefault(served.batch_group(mixing=True), []).append(i)
        return iter(groups.values())


def _quiet(context) -> None:
    """Ray Data's progress bars, execution logs and warnings off: the command prints one line at the end."""
    import logging

    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def _journal(output: Path) -> Path:
    return output if output.suffix == ".jsonl" else output.with_name(output.name + ".partial.jsonl")


def _drop_cut_line(path: Path) -> None:
    """A last line cut short when the job was stopped goes, so the rows appended next start on a line."""
    if not path.is_file():
        return
    text = path.read_bytes()
    if text and not text.endswith(b"\n"):
        with path.open("r+b") as handle:
            handle.truncate(text.rfind(b"\n") + 1)


def _jsonl_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # the line cut short when the job was stopped: predicted again
            continue
    return rows


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix != ".parquet" or not path.is_file():
        return []
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["image", "run"]).to_pylist()


def _write_parquet(output: Path) -> None:
    """The Parquet file from the earlier file's rows and the journal's; lists and objects as JSON text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = (pq.read_table(output).to_pylist() if output.is_file() else []) + _jsonl_rows(_journal(output))
    columns = list(dict.fromkeys(key for row in rows for key in row))  # error rows lack the prediction fields
    flat = [{key: json.dumps(row[key]) if isinstance(row.get(key), (list, dict)) else row.get(key) for key in columns}
            for row in rows]
    partial = output.with_name(output.name + ".writing")
    pq.write_table(pa.Table.from_pylist(flat), partial)
    partial.replace(output)
    _journal(output).unlink(missing_ok=True)
