"""Joining a Ray cluster, for ``visionlora serve --ray`` and ``visionlora predict --engine ray``."""

from __future__ import annotations

import logging
import math
import os


def join_cluster(address: str | None, cpus_needed: float) -> None:
    """Connect to the cluster at ``address`` (or ``RAY_ADDRESS``), or start one on this machine.

    Without an address a new local cluster is always started, never one found through a file that
    an earlier, killed cluster left behind. It holds at least what the job needs: Ray's CPUs are
    places to run, not cores; its GPUs are the ones Ray finds.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    num_cpus = None if address else max(os.cpu_count() or 1, math.ceil(cpus_needed))
    ray.init(address=address or "local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)
