"""Micro-batching: requests arriving within a short wait share one forward.

A batcher serves one model, or every mixing adapter of one base: then requests for different
adapters share a forward, each image with its own adapter.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image


@dataclass
class Job:
    """One request's images and options, and where its predictions go."""

    images: list[Image.Image]
    options: dict[str, Any]  # shared options; per-image ones are lists aligned with ``images``
    per_image: tuple[str, ...]
    model: Any = None  # what predicts the images (a served run), handed to ``predict`` once per image
    future: asyncio.Future | None = None  # set when submitted

    def batch_key(self) -> str:
        """Requests batch together only when their shared options are equal."""
        shared = {k: v for k, v in self.options.items() if k not in self.per_image}
        return json.dumps(shared, sort_keys=True, default=str)


class BatcherStopped(RuntimeError):
    """The batcher was stopped (the server is shutting down) before the job's forward ended."""


class Batcher:
    """Collects jobs for up to ``max_wait_ms``, ``max_batch_size`` images at a time, and runs
    ``predict(images, models, **options)`` (``models``: each image's job's model) for the batch
    in a worker thread. The worker ends when no job waits, and starts again with the next one;
    :meth:`stop` ends it for good."""

    def __init__(self, predict: Callable[..., list[dict]], executor: ThreadPoolExecutor,
                 max_batch_size: int, max_wait_ms: float, on_batch: Callable[[list], None] = lambda models: None):
        self.predict, self.executor, self.on_batch = predict, executor, on_batch
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000.0
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.worker: asyncio.Task | None = None
        self.stopped = False

    async def submit(self, job: Job) -> list[dict]:
        if self.stopped:
            raise BatcherStopped("the server is stopping")
        future = job.future = asyncio.get_running_loop().create_future()
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._run())
        await self.queue.put(job)
        return await future

    def stop(self) -> None:
        """Cancel the worker; the jobs it holds and those still queued fail with :class:`BatcherStopped`."""
        self.stopped = True
        if self.worker is not None and not self.worker.done():
            self.worker.cancel()
        waiting = []
        while not self.queue.empty():
            waiting.append(self.queue.get_nowait())
        _fail(waiting, BatcherStopped("the server is stopping"))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.queue.empty():
            jobs: list[Job] = []
            try:
                await self._collect(loop, jobs)
                for group in _groups(jobs, self.max_batch_size):
                    await self._forward(loop, group)
            except asyncio.CancelledError:
                _fail(jobs, BatcherStopped("the server is stopping"))
                raise

    async def _collect(self, loop: asyncio.AbstractEventLoop, jobs: list[Job]) -> None:
        """Into ``jobs``: the first waiting job, then those arriving within the wait, up to the batch size."""
        first = self.queue.get_nowait()
        jobs.append(first)
        size = len(first.images)
        deadline = loop.time() + self.max_wait
        while size < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                job = await asyncio.wait_for(self.queue.get(), remaining)
            except asyncio.TimeoutError:
                break
            jobs.append(job)
            size += len(job.images)

    async def _forward(self, loop, jobs: list[Job]) -> None:
        images = [image for job in jobs for image in job.images]
        models = [job.model for job in jobs for _ in job.images]
        options = dict(jobs[0].options)
        for name in jobs[0].per_image:
            options[name] = [value for job in jobs for value in job.options[name]]
        self.on_batch(models)
        try:
            predictions = await loop.run_in_executor(self.executor, lambda: self.predict(images, models, **options))
        except Exception as err:  # handed to each waiting request
            _fail(jobs, err)
            return
        start = 0
        for job in jobs:
            if job.future is not None and not job.future.done():
                job.future.set_result(predictions[start : start + len(job.images)])
            start += len(job.images)


def _fail(jobs: list[Job], error: Exception) -> None:
    """Answer each job not answered yet with ``error``."""
    for job in jobs:
        if job.future is not None and not job.future.done():
            job.future.set_exception(error)


def _groups(jobs: list[Job], max_images: int) -> list[list[Job]]:
    """Jobs with equal shared options, in arrival order, at most ``max_images`` images a group."""
    groups: list[list[Job]] = []
    open_groups: dict[str, list[Job]] = {}
    for job in jobs:
        key = job.batch_key()
        group = open_groups.get(key)
        if group is None or sum(len(j.images) for j in group) + len(job.images) > max_images:
            group = []
            groups.append(group)
            open_groups[key] = group
        group.append(job)
    return groups
