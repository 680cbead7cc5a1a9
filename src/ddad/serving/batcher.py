"""Micro-batching for the service: every image waits in one bounded queue; a single worker takes the first
waiting image, then whatever else arrives within ``max_wait`` up to ``batch_size``, and runs the batch in its
one inference thread (the model runs one batch at a time). A full queue refuses at once (:class:`QueueFull`:
the service answers 503 with Retry-After) instead of growing; an image whose request gave up (timeout, client
gone) before its batch started is dropped from it."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` images already."""


@dataclass
class Job:
    image: Any
    category: str | None
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """``await batcher.submit(image, category)`` -> (result, seconds queued, seconds of its batch's inference).
    ``run_batch(images, categories)`` is called in the inference thread with a list of images."""

    def __init__(self, run_batch: Callable[[list, list], Sequence], batch_size: int, max_wait: float,
                 max_queue: int, on_batch: Callable[[int, float], None] | None = None) -> None:
        if batch_size < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError("batch_size and max_queue must be >= 1, max_wait >= 0")
        self.run_batch, self.batch_size, self.max_wait, self.max_queue = run_batch, batch_size, max_wait, max_queue
        self.on_batch = on_batch or (lambda size, seconds: None)
        self.queue: asyncio.Queue[Job] | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddad-inference")
        self.task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return 0 if self.queue is None else self.queue.qsize()

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        """After the last request was answered: the worker ends, the inference thread with it."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def run_alone(self, images: list, categories: list):
        """One batch in the inference thread, outside the queue (the warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.run_batch, images, categories)

    def submit(self, image, category: str | None) -> asyncio.Future:
        if self.queue is None:
            raise RuntimeError("the batcher is not started")
        if self.queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self.queue.qsize()} images are waiting (the queue holds {self.max_queue})")
        job = Job(image, category, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(job)
        return job.future

    async def _collect(self) -> list[Job]:
        jobs = [await self.queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(jobs) < self.batch_size:
            left = deadline - time.perf_counter()
            try:
                jobs.append(self.queue.get_nowait() if left <= 0 else await asyncio.wait_for(self.queue.get(), left))
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
        return [j for j in jobs if not j.future.done()]  # given up while waiting: not run

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            if not jobs:
                continue
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, [j.image for j in jobs],
                                                     [j.category for j in jobs])
            except Exception as exc:  # the batch failed: each of its requests hears why
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            seconds = time.perf_counter() - start
            self.on_batch(len(jobs), seconds)
            for j, result in zip(jobs, results):
                if not j.future.done():
                    j.future.set_result((result, start - j.queued, seconds))
