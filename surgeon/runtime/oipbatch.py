"""Adaptive batching of checked numpy inputs, and the budget of pixels being decoded at once.

MLServer's own batcher merges requests before the model sees them, as pydantic lists, and splits the answer by
each request's declared shape[0]; a request whose data disagrees with its shape then shifts its batch mates' rows.
Here a request joins a batch only as a numpy array the model has already checked and converted, so its rows are
exactly its shape[0] and nothing it holds can reach another request's answer."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

#: rows -> the model's outputs for those rows, each with a leading dimension of the same length
RunRows = Callable[[np.ndarray], list[np.ndarray]]


class Batcher:
    """Merge concurrent requests' rows into one run: a batch closes after `max_requests` requests, when the next
    request would take it past `max_rows`, `max_wait_s` after its first request arrived, or as soon as no other
    request is being prepared (checked and converted, see `preparing`): a lone request on an idle server runs at
    once instead of waiting out the window. One batch runs at a time (in a worker thread: onnxruntime releases the
    GIL) while the next one fills, so under load requests batch whether or not they arrived within the window."""

    def __init__(
        self,
        run: RunRows,
        max_requests: int,
        max_wait_s: float,
        max_rows: int,
        observe: Callable[[int], None] | None = None,
    ):
        self._run = run
        self._max_requests = max_requests
        self._max_wait_s = max_wait_s
        self._max_rows = max_rows
        self._observe = observe or (lambda rows: None)
        self._waiting: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._preparing = 0

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Around a request's checks and conversion: the batch being formed may wait for it."""
        self._preparing += 1
        try:
            yield
        finally:
            self._preparing -= 1
            if self._arrived is not None:
                self._arrived.set()  # a batch waiting for this request stops waiting if it failed

    async def submit(self, rows: np.ndarray) -> list[np.ndarray]:
        """The outputs for `rows` (at most max_rows of them), run alone or with other requests' rows."""
        if self._max_requests == 1:
            self._observe(len(rows))
            return await asyncio.to_thread(self._run, rows)
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = asyncio.create_task(self._serve())
        assert self._arrived is not None
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((rows, future))
        self._arrived.set()
        return await future

    def _pending_rows(self) -> int:
        return sum(len(rows) for rows, _ in self._waiting)

    async def _serve(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self._max_wait_s
            while self._preparing and len(self._waiting) < self._max_requests and self._pending_rows() < self._max_rows:
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            await self._run_batch(self._take())

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        """The next batch from the front of the queue: at least one request, then as many as fit."""
        batch = [self._waiting.popleft()]
        rows = len(batch[0][0])
        while self._waiting and len(batch) < self._max_requests and rows + len(self._waiting[0][0]) <= self._max_rows:
            batch.append(self._waiting.popleft())
            rows += len(batch[-1][0])
        return batch

    async def _run_batch(self, batch: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        self._observe(sum(len(rows) for rows, _ in batch))
        merged = batch[0][0] if len(batch) == 1 else np.concatenate([rows for rows, _ in batch])
        try:
            outputs = await asyncio.to_thread(self._run, merged)
        except Exception as err:  # noqa: BLE001 - every caller of the batch gets the run's error
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        start = 0
        for rows, future in batch:
            if not future.done():
                future.set_result([output[start : start + len(rows)] for output in outputs])
            start += len(rows)


class PixelBudget:
    """At most `total` decoded pixels held at once by the threads decoding images: a thread waits for its image's
    pixels to fit. Every single image is smaller than `total` (the decoder's own limit), so each one fits alone."""

    def __init__(self, total: int):
        self.total = total
        self._used = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.total)
        with self._changed:
            self._changed.wait_for(lambda: self._used + pixels <= self.total)
            self._used += pixels
        try:
            yield
        finally:
            with self._changed:
                self._used -= pixels
                self._changed.notify_all()
