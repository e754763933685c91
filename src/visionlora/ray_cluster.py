"""Joining a Ray cluster, for ``visionlora serve --ray`` and ``visionlora predict --engine ray``; and
``train-many`` and ``tune`` spread over one (``--ray-address``), through Ray Tune."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from visionlora.errors import VisionLoraError


def join_cluster(address: str | None, cpus_needed: float) -> None:
    """Connect to the cluster at ``address`` (or ``RAY_ADDRESS``), or start one on this machine.

    Without an address a new local cluster is always started, never one found through a file that
    an earlier, killed cluster left behind. It holds at least what the job needs: Ray's CPUs are
    places to run, not cores; its GPUs are the ones Ray finds.
    """
    import ray

    if ray.is_initialized():  # joined already (e.g. by an earlier rung of a tune)
        return
    address = address or os.environ.get("RAY_ADDRESS")
    num_cpus = None if address else max(os.cpu_count() or 1, math.ceil(cpus_needed))
    ray.init(address=address or "local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)


def train_many_on_ray(jobs: list, output: Path, address: str | None, say: Callable[[str], None] = print,
                      resuming: bool = False, shares: int | None = None, pack_rows: int | None = None) -> list:
    """``train_many`` spread over a Ray cluster through Ray Tune: the jobs are dealt into shares, one Ray Tune
    trial per share (its bookkeeping, retries and results), and each worker trains its share packed. The run
    folders land under ``output``, which every node must see (shared storage)."""
    from ray import tune

    from visionlora.training.many import save_plan
    from visionlora.training.packing import Outcome

    output.mkdir(parents=True, exist_ok=True)
    if not resuming:
        save_plan(output, jobs)
    join_cluster(address, 1)
    count, resources = _shares(len(jobs), shares)
    dealt = [[(job.name, job.cfg.to_dict()) for job in jobs[i::count]] for i in range(count)]
    say(f"train-many on Ray: {len(jobs)} jobs in {count} shares, each trained packed by one worker")
    run_config = tune.RunConfig(name=f"train-many-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(output / "ray"),
                                verbose=0)
    space = {"share": tune.grid_search(list(range(count))), "jobs": dealt, "output": str(output),
             "resuming": resuming, "pack_rows": pack_rows}
    tuner = tune.Tuner(tune.with_resources(_train_share, resources), param_space=space, run_config=run_config)
    grid = tuner.fit()
    outcomes = []
    for index in range(len(grid)):
        result = grid[index]
        if result.error is not None:
            raise VisionLoraError(f"a Ray worker failed: {str(result.error).strip().splitlines()[-1]}")
        outcomes += [Outcome(**row) for row in (result.metrics or {}).get("outcomes", [])]
    order = {job.name: i for i, job in enumerate(jobs)}
    return sorted(outcomes, key=lambda outcome: order.get(outcome.name, len(order)))


def _shares(jobs: int, asked: int | None) -> tuple[int, dict[str, float]]:
    """(how many shares, each one's Ray resources): a GPU each where the cluster has GPUs, else a CPU; one
    share per GPU (or CPU) the cluster has, at most one per job, unless ``asked``."""
    import ray

    available = ray.cluster_resources()
    gpus = int(available.get("GPU", 0))
    slots = gpus or int(available.get("CPU", 1))
    count = max(1, min(jobs, asked or slots))
    return count, ({"cpu": 1, "gpu": 1} if gpus else {"cpu": 1})


def _train_share(config: dict[str, Any]) -> None:
    """A Ray Tune trial: train one share of the jobs packed, and report each job's outcome."""
    import dataclasses

    from ray import tune

    from visionlora.config import TrainConfig
    from visionlora.training.many import train_many
    from visionlora.training.packing import Job

    share = config["jobs"][config["share"]]
    jobs = [Job(name, TrainConfig.from_dict(settings)) for name, settings in share]
    folder = Path(config["output"]) / ".shares" / f"share{config['share']}"
    outcomes = train_many(jobs, folder, print, config["resuming"] and folder.is_dir(), config["pack_rows"])
    tune.report({"outcomes": [dataclasses.asdict(outcome) for outcome in outcomes]})
