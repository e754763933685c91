"""Micro-batching: requests arriving within a short wait share one forward.

A batcher serves one model, or every mixing adapter of one base: then requests for different
adapters share a forward, each image with its own adapter. A forward that runs out of
accelerator memory is retried in halves (down to one image) once the allocator's cache is freed;
a request with an image that does not fit even alone fails with :class:`OutOfMemory`, and the
others of its batch are answered.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image

from visionlora.serving.memory import OutOfMemory, free_cached_memory

FORWARD_TIME_WEIGHT = 0.3  # the weight of the latest forward in the moving average of their time


@dataclass
class Job:
    """One request's images and options, and where its predictions go."""

    images: list[Image.Image]
    options: dict[str, Any]  # shared options; per-image ones are lists aligned with ``images``
    per_image: tuple[str, ...]
    model: Any = None  # what predicts the images (a served run), handed to ``predict`` once per image
    deadline: float | None = None  # the event loop's time by which the request must be answered
    future: asyncio.Future | None = None  # set when submitted

    def batch_key(self) -> str:
        """Requests batch together only when their shared options are equal."""
        shared = {k: v for k, v in self.options.items() if k not in self.per_image}
        return json.dumps(shared, sort_keys=True, default=str)


class BatcherStopped(RuntimeError):
    """The batcher was stopped (the server is shutting down) before the job's forward ended."""


class DeadlineMissed(RuntimeError):
    """The job's deadline would pass before a forward started now ends: it is dropped unrun."""


class Batcher:
    """Collects jobs for up to ``max_wait_ms``, ``max_batch_size`` images at a time, and runs
    ``predict(images, models, **options)`` (``models``: each image's job's model) for the batch
    in a worker thread. The worker ends when no job waits, and starts again with the next one;
    :meth:`stop` ends it for good. ``on_batch(models)`` is called for each batch, ``on_split(models)``
    for each forward that ran out of memory and is retried in halves, ``on_drop(images)`` for the images
    of jobs not run: their request went away, or its deadline would pass before the forward ended
    (as long as the last forwards took), which fails it with :class:`DeadlineMissed` at once. Under
    overload the accelerator's time thus goes to requests that can still be answered."""

    def __init__(self, predict: Callable[..., list[dict]], executor: ThreadPoolExecutor,
                 max_batch_size: int, max_wait_ms: float, on_batch: Callable[[list], None] = lambda models: None,
                 on_split: Callable[[list], None] = lambda models: None,
                 on_drop: Callable[[int], None] = lambda images: None):
        self.predict, self.executor, self.on_batch, self.on_split = predict, executor, on_batch, on_split
        self.on_drop = on_drop
        self.forward_seconds = 0.0  # how long forwards take, a moving average of the recent ones
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
                    waiting = self._answerable(loop, group)
                    if waiting:
                        await self._forward(loop, waiting)
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

    def _answerable(self, loop: asyncio.AbstractEventLoop, jobs: list[Job]) -> list[Job]:
        """The jobs a forward started now can still answer in time; the others are dropped (those whose
        deadline would pass first fail with :class:`DeadlineMissed`)."""
        ends = loop.time() + self.forward_seconds
        kept = []
        for job in jobs:
            if job.future is not None and job.future.done():
                continue
            if job.deadline is not None and job.deadline < ends:
                if job.future is not None:
                    job.future.set_exception(DeadlineMissed(f"the request's deadline would pass before a forward "
                                                            f"of {self.forward_seconds:.2g} s ended"))
                continue
            kept.append(job)
        if len(kept) < len(jobs):
            self.on_drop(sum(len(job.images) for job in jobs if job not in kept))
        return kept

    async def _forward(self, loop, jobs: list[Job]) -> None:
        images = [image for job in jobs for image in job.images]
        models = [job.model for job in jobs for _ in job.images]
        options = dict(jobs[0].options)
        for name in jobs[0].per_image:
            options[name] = [value for job in jobs for value in job.options[name]]
        self.on_batch(models)
        started = loop.time()
        try:
            predictions = await loop.run_in_executor(self.executor, self._predict_fitting, images, models, options,
                                                     jobs[0].per_image)
        except Exception as err:  # handed to each waiting request
            _fail(jobs, err)
            return
        finally:
            seconds = loop.time() - started
            weight = FORWARD_TIME_WEIGHT if self.forward_seconds else 1.0  # the first forward sets it alone
            self.forward_seconds = weight * seconds + (1 - weight) * self.forward_seconds
        _answer(jobs, predictions)

    def _predict_fitting(self, images: list, models: list, options: dict[str, Any],
                         per_image: tuple[str, ...]) -> list[dict | OutOfMemory]:
        """The predictions of ``images``; a forward that runs out of accelerator memory is retried in
        halves once the cache is freed, and an image that does not fit even alone gets an
        :class:`OutOfMemory` in place of its prediction."""
        with suppress(torch.OutOfMemoryError):  # the retry runs once the failed forward's tensors are freed
            return list(self.predict(images, models, **options))
        free_cached_memory()
        if len(images) == 1:
            return [OutOfMemory("out of accelerator memory: the image does not fit even alone in a forward; "
                                "try again later")]
        self.on_split(models)
        half = (len(images) + 1) // 2
        return (self._predict_fitting(images[:half], models[:half], _sliced(options, per_image, 0, half), per_image)
                + self._predict_fitting(images[half:], models[half:], _sliced(options, per_image, half, None),
                                        per_image))


def _answer(jobs: list[Job], predictions: list[dict | OutOfMemory]) -> None:
    """Each job its predictions, in order; a job with an image that did not fit fails with its error."""
    start = 0
    for job in jobs:
        answers = predictions[start : start + len(job.images)]
        start += len(job.images)
        if job.future is None or job.future.done():
            continue
        failed = next((answer for answer in answers if isinstance(answer, OutOfMemory)), None)
        if failed is not None:
            job.future.set_exception(failed)
        else:
            job.future.set_result(answers)


def _sliced(options: dict[str, Any], per_image: tuple[str, ...], start: int, stop: int | None) -> dict[str, Any]:
    """``options`` for the images ``start:stop`` of a batch: per-image ones cut alike, shared ones kept."""
    return {name: value[start:stop] if name in per_image else value for name, value in options.items()}


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
