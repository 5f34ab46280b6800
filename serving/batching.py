"""Dynamic batching: requests whose images have the same height and width are stacked along N, up to
``max_batch`` images and ``max_work`` pixels of work (a batch costs the sum of its members, see
``serving.limits``) or until the oldest has waited ``max_delay_ms``; one batch runs at a time in a
worker thread while the next one gathers. The number of images waiting is bounded: past ``max_queue``
a request is refused at once (the server answers 503 with Retry-After) instead of piling up."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .backends import Backend
from .stats import ModelStats


class QueueFull(Exception):
    """Too many images are waiting; try again shortly."""


class ShuttingDown(Exception):
    """The batcher is draining and accepts no new work."""


@dataclass
class _Item:
    images: np.ndarray
    future: asyncio.Future
    work: int
    arrived: float = field(default_factory=time.monotonic)


def _count(items: list[_Item]) -> int:
    return sum(i.images.shape[0] for i in items)


def _work(items: list[_Item]) -> int:
    return sum(i.work for i in items)


class DynamicBatcher:
    def __init__(self, backend: Backend, max_batch: int = 8, max_delay_ms: float = 5.0, max_queue: int = 64,
                 on_batch=None, max_work: float = float("inf"), pixel_cost: float = 1.0, stats: ModelStats | None = None):
        self.backend, self.max_batch, self.max_delay, self.max_queue = backend, max_batch, max_delay_ms / 1000, max_queue
        self.max_work, self.pixel_cost = max_work, pixel_cost
        self.on_batch = on_batch or (lambda size: None)
        self.stats = stats or ModelStats()
        self.waiting = 0
        self.closing = False
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if self.closing:
            raise ShuttingDown()
        n = images.shape[0]
        if self.waiting + n > self.max_queue:
            raise QueueFull()
        self.waiting += n
        work = int(images.shape[0] * images.shape[2] * images.shape[3] * self.pixel_cost)
        item = _Item(images, asyncio.get_running_loop().create_future(), work)
        self._queue.put_nowait(item)
        try:
            return await item.future
        finally:
            self.waiting -= n

    async def _loop(self) -> None:
        buckets: dict[tuple[int, int], list[_Item]] = {}
        while True:
            if not buckets:
                await self._add(buckets, await self._queue.get())
            # Everything that queued up meanwhile (e.g. during the last inference) joins before any flush.
            while not self._queue.empty():
                await self._add(buckets, self._queue.get_nowait())
            now = time.monotonic()
            for key in [k for k, b in buckets.items() if b[0].arrived + self.max_delay <= now]:
                await self._run(buckets.pop(key))
            if buckets:
                timeout = min(b[0].arrived for b in buckets.values()) + self.max_delay - time.monotonic()
                if timeout > 0:
                    try:
                        await self._add(buckets, await asyncio.wait_for(self._queue.get(), timeout))
                    except asyncio.TimeoutError:
                        pass

    async def _add(self, buckets: dict, item: _Item) -> None:
        """Put an item in its shape's bucket, running the bucket when it is (or would get) over full."""
        key = item.images.shape[2:]
        if key in buckets and (_count(buckets[key]) + item.images.shape[0] > self.max_batch
                               or _work(buckets[key]) + item.work > self.max_work):
            await self._run(buckets.pop(key))
        buckets.setdefault(key, []).append(item)
        if _count(buckets[key]) >= self.max_batch or _work(buckets[key]) >= self.max_work:
            await self._run(buckets.pop(key))

    async def _run(self, items: list[_Item]) -> None:
        batch = np.concatenate([i.images for i in items]) if len(items) > 1 else items[0].images
        self.on_batch(batch.shape[0])
        start_ns = time.monotonic_ns()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self.backend.infer, batch)
            self.stats.record_execution(batch.shape[0], [start_ns - int(i.arrived * 1e9) for i in items],
                                        time.monotonic_ns() - start_ns)
        except Exception as err:  # the backend failed: every request of the batch gets the error
            for i in items:
                if not i.future.done():
                    i.future.set_exception(err)
            return
        start = 0
        for i in items:
            n = i.images.shape[0]
            if not i.future.done():
                i.future.set_result({k: v[start:start + n] for k, v in outputs.items()})
            start += n

    async def drain(self, timeout: float = 30.0) -> None:
        """Refuse new work, let everything already accepted finish, then stop."""
        self.closing = True
        deadline = time.monotonic() + timeout
        while self.waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)
