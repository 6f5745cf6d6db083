"""serve-model's batcher (`surgeon.runtime.oipbatch`) on its own: merging, splitting, waiting and the pixel budget."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from surgeon.runtime.oipbatch import Batcher, PixelBudget


class Recorder:
    """A model whose output row i is its input row i times 2, recording the rows of every run."""

    def __init__(self, fail: bool = False):
        self.runs: list[int] = []
        self.fail = fail

    def __call__(self, rows: np.ndarray) -> list[np.ndarray]:
        self.runs.append(len(rows))
        if self.fail:
            raise RuntimeError("onnxruntime failed")
        return [rows * 2, rows.sum(axis=1)]


def test_a_lone_request_does_not_wait_out_the_window():
    model = Recorder()
    batcher = Batcher(model, max_requests=8, max_wait_s=5.0, max_rows=64)

    async def main() -> float:
        start = time.perf_counter()
        with batcher.preparing():
            rows = np.ones((2, 3))
        await batcher.submit(rows)
        return time.perf_counter() - start

    assert asyncio.run(main()) < 1.0 and model.runs == [2]


def test_requests_being_prepared_join_the_batch_and_each_gets_its_own_rows():
    model = Recorder()
    batcher = Batcher(model, max_requests=8, max_wait_s=5.0, max_rows=64)

    async def one(value: float, rows: int, delay: float) -> list[np.ndarray]:
        with batcher.preparing():
            await asyncio.sleep(delay)  # checking and converting, as a file request does in a thread
            array = np.full((rows, 3), value)
        return await batcher.submit(array)

    async def main() -> list[list[np.ndarray]]:
        return await asyncio.gather(one(1.0, 1, 0.0), one(2.0, 2, 0.05), one(3.0, 3, 0.1))

    answers = asyncio.run(main())
    assert model.runs == [6]  # one run: the batch waited for the requests still being prepared
    for value, rows, (doubled, sums) in zip((1.0, 2.0, 3.0), (1, 2, 3), answers, strict=True):
        np.testing.assert_array_equal(doubled, np.full((rows, 3), 2 * value))
        np.testing.assert_array_equal(sums, np.full(rows, 3 * value))


def test_a_request_failing_its_checks_releases_the_batch_waiting_for_it():
    model = Recorder()
    batcher = Batcher(model, max_requests=8, max_wait_s=30.0, max_rows=64)

    async def bad() -> None:
        with batcher.preparing():
            await asyncio.sleep(0.05)
            raise ValueError("malformed")

    async def main() -> float:
        start = time.perf_counter()
        results = await asyncio.gather(batcher.submit(np.ones((1, 3))), bad(), return_exceptions=True)
        assert isinstance(results[1], ValueError)
        np.testing.assert_array_equal(results[0][0], np.full((1, 3), 2.0))
        return time.perf_counter() - start

    assert asyncio.run(main()) < 5.0 and model.runs == [1]


def test_batches_stop_at_max_rows_and_max_requests_and_errors_reach_every_caller():
    model = Recorder()
    batcher = Batcher(model, max_requests=2, max_wait_s=0.5, max_rows=4)

    async def main() -> None:
        sizes = [3, 3, 1, 1, 1]
        arrays = [np.full((n, 2), i, dtype=float) for i, n in enumerate(sizes)]
        answers = await asyncio.gather(*(batcher.submit(a) for a in arrays))
        for array, (doubled, _) in zip(arrays, answers, strict=True):
            np.testing.assert_array_equal(doubled, array * 2)

    asyncio.run(main())
    assert model.runs == [3, 4, 2]  # 3+3 > 4 rows; 3+1 fits, a third would pass two requests; then 1+1
    failing = Batcher(Recorder(fail=True), max_requests=4, max_wait_s=0.05, max_rows=8)

    async def both() -> list:
        return await asyncio.gather(*(failing.submit(np.ones((1, 2))) for _ in range(2)), return_exceptions=True)

    assert [str(e) for e in asyncio.run(both())] == ["onnxruntime failed"] * 2


def test_pixel_budget_holds_threads_until_their_pixels_fit():
    budget = PixelBudget(100)
    held, peak, lock = [0], [0], threading.Lock()

    def decode(pixels: int) -> None:
        with budget.hold(pixels):
            with lock:
                held[0] += pixels
                peak[0] = max(peak[0], held[0])
            time.sleep(0.02)
            with lock:
                held[0] -= pixels

    threads = [threading.Thread(target=decode, args=(p,)) for p in (60, 60, 40, 30, 100, 70)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in threads) and peak[0] <= 100
    with budget.hold(500):  # more than the whole budget (never more than one image): held alone, no deadlock
        pass


@pytest.mark.parametrize("max_requests", [1, 4])
def test_one_request_per_run_without_batching(max_requests):
    model = Recorder()
    batcher = Batcher(model, max_requests=max_requests, max_wait_s=0.0, max_rows=16)

    async def main() -> None:
        for n in (1, 2):
            (doubled, _) = await batcher.submit(np.ones((n, 2)))
            assert doubled.shape == (n, 2)

    asyncio.run(main())
    assert model.runs == [1, 2]
