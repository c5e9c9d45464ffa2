"""The dynamic batcher on its own: coalescing, splitting, order, the bounded queue, drain on close."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry

from service.batcher import Batcher, BatcherClosedError
from service.errors import InferenceError, QueueFullError
from service.metrics import Metrics


class RecordingModel:
    """score = the first pixel of each frame; remembers every batch size and the thread it ran on."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.batches: list[int] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.fail = fail

    def __call__(self, frames: npt.NDArray[np.uint8]) -> dict[str, npt.NDArray[np.float32]]:
        self.batches.append(len(frames))
        self.threads.add(threading.current_thread().name)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("graph exploded")
        return {"score": frames[:, 0, 0, 0].astype(np.float32)}


def frames_with(values: list[int]) -> npt.NDArray[np.uint8]:
    out = np.zeros((len(values), 2, 2, 3), dtype=np.uint8)
    out[:, 0, 0, 0] = values
    return out


def make(model: RecordingModel, **kwargs: object) -> Batcher:
    kwargs.setdefault("max_batch_size", 8)
    kwargs.setdefault("max_queue_delay_ms", 20.0)
    kwargs.setdefault("eager", False)  # Triton's rule unless a test is about eager dispatch
    return Batcher(model, name="m", version=1, metrics=Metrics(CollectorRegistry()), **kwargs)  # type: ignore[arg-type]


def test_concurrent_requests_are_coalesced_and_each_gets_its_own_rows_in_order() -> None:
    model = RecordingModel()

    async def scenario() -> list[list[float]]:
        batcher = make(model)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(frames_with([i, i + 100])) for i in range(4)))
        await batcher.close()
        return [r["score"].tolist() for r in results]

    results = asyncio.run(scenario())
    assert results == [[i, i + 100] for i in range(4)]
    assert model.batches == [8], "four 2-frame requests within the delay form one batch of 8"
    assert len(model.threads) == 1 and not model.threads & {threading.main_thread().name}


def test_a_full_batch_goes_without_waiting_for_the_delay() -> None:
    model = RecordingModel()

    async def scenario() -> float:
        batcher = make(model, max_queue_delay_ms=5_000.0)
        batcher.start()
        started = time.perf_counter()
        await batcher.submit(frames_with(list(range(8))))
        elapsed = time.perf_counter() - started
        await batcher.close()
        return elapsed

    assert asyncio.run(scenario()) < 2.0


def test_eager_dispatch_sends_a_lone_request_at_once_but_waits_for_announced_ones() -> None:
    model = RecordingModel()

    async def scenario() -> tuple[float, list[int]]:
        batcher = make(model, max_queue_delay_ms=5_000.0, eager=True)
        batcher.start()
        started = time.perf_counter()
        await batcher.submit(frames_with([1]))  # nobody else announced: no 5 s wait
        lone = time.perf_counter() - started

        async def announced(value: int, decode_s: float) -> None:
            with batcher.incoming():
                await asyncio.sleep(decode_s)  # stands in for decoding in a thread
            await batcher.submit(frames_with([value]))

        await asyncio.gather(announced(2, 0.0), announced(3, 0.2))
        await batcher.close()
        return lone, model.batches

    lone, batches = asyncio.run(scenario())
    assert lone < 1.0
    assert batches == [1, 2], "the second batch waited for the announced request still decoding"


def test_a_request_larger_than_a_batch_is_split_and_reassembled_in_order() -> None:
    model = RecordingModel()

    async def scenario() -> list[float]:
        batcher = make(model, max_batch_size=4, max_queue_delay_ms=1.0)
        batcher.start()
        out = await batcher.submit(frames_with(list(range(10))))
        await batcher.close()
        return out["score"].tolist()

    assert asyncio.run(scenario()) == list(range(10))
    assert model.batches == [4, 4, 2]


def test_a_full_queue_refuses_with_429_and_a_retry_after() -> None:
    model = RecordingModel(delay_s=0.05)

    async def scenario() -> tuple[int, list[BaseException | object]]:
        batcher = make(model, max_batch_size=2, max_queue_frames=4, max_queue_delay_ms=50.0)
        batcher.start()
        tasks = [asyncio.ensure_future(batcher.submit(frames_with([i]))) for i in range(10)]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.close()
        return batcher.queued_frames, outcomes

    left, outcomes = asyncio.run(scenario())
    refused = [o for o in outcomes if isinstance(o, QueueFullError)]
    served = [o for o in outcomes if isinstance(o, dict)]
    assert len(served) == 4 and len(refused) == 6
    assert all(int(e.headers["Retry-After"]) >= 1 for e in refused)
    assert "exceed the limit of 4" in refused[0].detail
    assert left == 0


def test_close_finishes_queued_requests_then_refuses_new_ones() -> None:
    model = RecordingModel(delay_s=0.02)

    async def scenario() -> tuple[list[float], bool]:
        batcher = make(model, max_queue_delay_ms=1_000.0)
        batcher.start()
        queued = asyncio.ensure_future(batcher.submit(frames_with([7])))
        await asyncio.sleep(0)  # let it reach the queue
        await batcher.close()  # must not wait the full 1 s delay, and must serve the queued frame
        try:
            await batcher.submit(frames_with([1]))
        except BatcherClosedError:
            refused = True
        else:
            refused = False
        return (await queued)["score"].tolist(), refused

    started = time.perf_counter()
    scores, refused = asyncio.run(scenario())
    assert scores == [7] and refused
    assert time.perf_counter() - started < 0.9


def test_a_failing_model_fails_only_its_batch_with_an_inference_error() -> None:
    async def scenario() -> BaseException:
        batcher = make(RecordingModel(fail=True), max_queue_delay_ms=0.0)
        batcher.start()
        with pytest.raises(InferenceError) as caught:
            await batcher.submit(frames_with([1]))
        await batcher.close()
        return caught.value

    assert "graph exploded" in str(asyncio.run(scenario()))


def test_a_model_returning_the_wrong_number_of_rows_is_an_inference_error() -> None:
    def short(frames: npt.NDArray[np.uint8]) -> dict[str, npt.NDArray[np.float32]]:
        return {"score": np.zeros(1, np.float32)}

    async def scenario() -> str:
        batcher = Batcher(short, name="m", version=1, max_queue_delay_ms=0)
        batcher.start()
        with pytest.raises(InferenceError) as caught:
            await batcher.submit(frames_with([1, 2, 3]))
        still_serving = await batcher.submit(frames_with([4]))  # one frame, one row: fine again
        assert still_serving["score"].shape == (1,)
        await batcher.close()
        return str(caught.value)

    assert "one row per frame" in asyncio.run(scenario())


def test_metrics_record_batch_sizes_queue_wait_and_inference_time() -> None:
    metrics = Metrics(CollectorRegistry())

    async def scenario() -> None:
        batcher = Batcher(
            RecordingModel(), name="m", version=3, max_batch_size=4, max_queue_delay_ms=10, metrics=metrics
        )
        batcher.start()
        await asyncio.gather(*(batcher.submit(frames_with([i])) for i in range(4)))
        await batcher.close()

    asyncio.run(scenario())
    labels = {"model": "m", "version": "3"}
    get = metrics.registry.get_sample_value
    assert get("edgecase_batch_size_frames_count", labels) == 1
    assert get("edgecase_batch_size_frames_sum", labels) == 4
    assert get("edgecase_queue_wait_seconds_count", labels) == 4
    assert get("edgecase_inference_duration_seconds_count", labels) == 1
    assert get("edgecase_queue_depth_frames", labels) == 0


def test_bad_configuration_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(RecordingModel(), name="m", version=1, max_batch_size=0)
