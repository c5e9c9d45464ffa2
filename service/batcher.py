"""Dynamic batching for one model version, after Triton's dynamic batcher.

Requests put their frames in one bounded queue; a collector task takes the oldest frames as soon as a
batch of `max_batch_size` is waiting or the oldest frame has waited `max_queue_delay` (whichever comes
first), and one worker thread per model version runs `session.run` on the batch, off the event loop.
While a batch runs, new frames queue up, so under load batches fill without waiting for the delay.
A request larger than a batch is split across consecutive batches; each request gets one future with
its own rows back, in order.

One departure from Triton, on by default (`eager=True`): the delay is only spent while another
request is already on its way to this batcher (looked up, still decoding: see `incoming()`). A lone
request goes at once instead of waiting out the delay, so low concurrency pays no batching latency
while high concurrency still fills batches. `eager=False` gives Triton's rule exactly.

The queue is bounded in frames: a request that does not fit answers 429 (`QueueFullError`) at once
instead of growing memory. `close()` stops taking requests but finishes everything queued, which is
what a hot swap needs: in-flight requests complete on the old version while new ones go to the new.

Nothing wedges silently: any exception in the collector (taking a batch, concatenating, running,
delivering rows) fails the requests of the batch in hand with a 500 naming the model, and the loop
goes on. Should the loop still end without `close()` (cancelled, or a BaseException), every queued
request is failed at once, `stopped` says why, and `on_stop` tells the owner (the pool restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from service.errors import InferenceError, NotReadyError, QueueFullError
from service.metrics import Metrics
from service.request_context import current_request_id

log = logging.getLogger(__name__)

Outputs = dict[str, npt.NDArray[np.float32]]
ScoreFn = Callable[[npt.NDArray[np.uint8]], Outputs]


class BatcherClosedError(NotReadyError):
    """The batcher was retired (its version was replaced); reaching a client it is a 503 with Retry-After."""


@dataclass(eq=False)
class _Pending:
    """One request's frames in the queue, possibly spread over several batches."""

    frames: npt.NDArray[np.uint8]
    future: asyncio.Future[Outputs]
    enqueued_at: float
    # The X-Request-ID of the request, so the log of the batch that scored it can name it.
    request_id: str | None = field(default_factory=current_request_id)
    taken: int = 0  # frames handed to batches so far
    done: int = 0  # frames whose outputs are back
    outputs: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.frames.shape[0])


class Batcher:
    """Coalesces concurrent requests for one model version into batches; see the module docstring."""

    def __init__(
        self,
        score: ScoreFn,
        *,
        name: str,
        version: int,
        max_batch_size: int = 32,
        max_queue_delay_ms: float = 2.0,
        max_queue_frames: int = 1024,
        eager: bool = True,
        metrics: Metrics | None = None,
        on_stop: Callable[[Batcher, str], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_frames < 1 or max_queue_delay_ms < 0:
            raise ValueError("max_batch_size and max_queue_frames must be >= 1, max_queue_delay_ms >= 0")
        self._score = score
        self.name = name
        self.version = version
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_queue_delay_ms / 1000.0
        self.max_queue_frames = max_queue_frames
        self.eager = eager
        self._incoming = 0  # requests between lookup and submit (decoding, resizing)
        self._metrics = metrics
        self._labels = {"model": name, "version": str(version)}
        self._queue: deque[_Pending] = deque()
        self._queued_frames = 0
        self._wakeup = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._stopped: str | None = None  # why the collector ended without close()
        self._in_hand: list[tuple[_Pending, int, int]] = []
        self._on_stop = on_stop
        # One thread per version: session.run calls for one model never compete with each other.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}-{version}")
        self._batch_seconds = 0.01  # running estimate, for Retry-After

    @property
    def queued_frames(self) -> int:
        return self._queued_frames

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stopped(self) -> str | None:
        """Why the collector loop ended although nobody closed this batcher; None while it runs."""
        return self._stopped

    def start(self) -> None:
        """Start the collector task on the running event loop."""
        if self._task is None:
            # A fresh context: started during a request, the collector must not log as that request.
            self._task = asyncio.get_running_loop().create_task(
                self._collect(), name=f"batcher-{self.name}-{self.version}", context=contextvars.Context()
            )
            self._task.add_done_callback(self._collector_ended)

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce a request that will submit soon (wrap its decoding), so a forming batch waits for it."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._wakeup.set()

    async def submit(self, frames: npt.NDArray[np.uint8]) -> Outputs:
        """Score an NHWC uint8 batch of any size; returns each output with one row per frame, in order.

        Raises QueueFullError (429) when the frames do not fit in the queue, BatcherClosedError after
        close(), InferenceError when the session fails on the batch.
        """
        n = int(frames.shape[0])
        if n == 0:
            raise ValueError("no frames to score")
        # No await between these checks and the append: the swap logic relies on it.
        if self._closed:
            raise BatcherClosedError(f"model {self.name} version {self.version} is retired; retry")
        if self._stopped is not None:
            raise NotReadyError(f"model {self.name} version {self.version} is not ready: {self._stopped}")
        if self._task is None:
            raise RuntimeError("Batcher.start() was not called")
        if self._queued_frames + n > self.max_queue_frames and self._queued_frames > 0:
            raise QueueFullError(
                f"model {self.name} version {self.version}: queue holds {self._queued_frames} frames, "
                f"{n} more would exceed the limit of {self.max_queue_frames}",
                retry_after_s=self._retry_after(),
            )
        pending = _Pending(frames, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._queue.append(pending)
        self._set_depth(self._queued_frames + n)
        self._wakeup.set()
        return await pending.future

    async def close(self) -> None:
        """Refuse new requests, finish every queued one, then stop the worker thread."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None and not self._task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    def _retry_after(self) -> int:
        batches_ahead = math.ceil(self._queued_frames / self.max_batch_size)
        return max(1, math.ceil(batches_ahead * self._batch_seconds))

    def _set_depth(self, frames: int) -> None:
        self._queued_frames = frames
        if self._metrics is not None:
            self._metrics.queue_depth.labels(**self._labels).set(frames)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            parts: list[tuple[_Pending, int, int]] = []
            self._in_hand = parts  # what _collector_ended must fail if the loop dies mid-batch
            try:
                if not self._queue:
                    if self._closed:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._wait_for_batch()
                self._take_batch(parts)
                if parts:
                    await self._run_batch(loop, parts)
            except Exception as exc:  # anything at all: fail this batch, keep the loop alive
                log.exception("model %s/%s: a batch failed", self.name, self.version)
                if not parts and self._queue:  # failed before taking anything: drop the oldest, or spin
                    oldest = self._queue.popleft()
                    self._set_depth(self._queued_frames - (oldest.size - oldest.taken))
                    parts = [(oldest, oldest.taken, oldest.size)]
                detail = f"model {self.name} version {self.version} failed: {type(exc).__name__}: {exc}"
                self._fail(parts, InferenceError(detail))

    async def _wait_for_batch(self) -> None:
        """Wait for a full batch or until the oldest frame has waited max_delay (Triton's rule)."""
        deadline = self._queue[0].enqueued_at + self.max_delay_s
        while self._queued_frames < self.max_batch_size and not self._closed:
            if self.eager and self._incoming == 0:
                break  # nobody else is coming: waiting would only add latency
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _collector_ended(self, task: asyncio.Task[None]) -> None:
        """Done-callback of the collector: after close() this is the normal end; otherwise say so."""
        if self._closed and not task.cancelled() and task.exception() is None:
            return
        if task.cancelled():
            reason = "its batching loop was cancelled"
        else:
            exc = task.exception()
            reason = f"its batching loop ended: {type(exc).__name__}: {exc}" if exc else "its loop ended"
        self._stopped = reason
        log.error("model %s/%s is not serving: %s", self.name, self.version, reason)
        error = NotReadyError(f"model {self.name} version {self.version} is not ready: {reason}")
        self._fail(self._in_hand, error)
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(error)
        self._set_depth(0)
        self._executor.shutdown(wait=False)
        if self._on_stop is not None and not self._closed:
            self._on_stop(self, reason)

    def _take_batch(self, parts: list[tuple[_Pending, int, int]]) -> None:
        """Append slices (request, start, stop) adding up to at most max_batch_size frames, oldest first.

        Appends to the caller's list as it goes, so that if anything fails half-way the caller still
        knows which requests it had taken and can fail them instead of leaving them waiting.
        """
        room = self.max_batch_size
        now = time.perf_counter()
        taken = 0
        try:
            while self._queue and room > 0:
                pending = self._queue[0]
                if pending.future.done():  # the client went away: drop what is left of its frames
                    self._queue.popleft()
                    taken += pending.size - pending.taken
                    continue
                if pending.taken == 0 and self._metrics is not None:
                    self._metrics.queue_wait.labels(**self._labels).observe(now - pending.enqueued_at)
                count = min(room, pending.size - pending.taken)
                parts.append((pending, pending.taken, pending.taken + count))
                pending.taken += count
                room -= count
                taken += count
                if pending.taken == pending.size:
                    self._queue.popleft()
        finally:
            self._set_depth(self._queued_frames - taken)

    async def _run_batch(
        self, loop: asyncio.AbstractEventLoop, parts: list[tuple[_Pending, int, int]]
    ) -> None:
        if len(parts) == 1:
            pending, start, stop = parts[0]
            batch = pending.frames[start:stop]
        else:
            batch = np.concatenate([p.frames[start:stop] for p, start, stop in parts])
        started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executor, self._score, batch)
            wrong = {k: list(v.shape) for k, v in outputs.items() if v.ndim == 0 or len(v) != len(batch)}
            if wrong:
                raise ValueError(f"outputs {wrong} do not have one row per frame ({len(batch)})")
        except Exception as exc:  # onnxruntime has its own exception types
            # Logged here without a traceback: a failing graph is the model's fault, not a bug of ours.
            log.error(
                "model %s/%s failed on a batch of %d: %s",
                self.name, self.version, len(batch), exc, extra=self._log_fields(parts),
            )  # fmt: skip
            self._fail(parts, InferenceError(f"model {self.name} version {self.version} failed: {exc}"))
            return
        elapsed = time.perf_counter() - started
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "scored a batch of %d frames from %d requests in %.1f ms",
                len(batch), len(parts), elapsed * 1000, extra=self._log_fields(parts),
            )  # fmt: skip
        if self._metrics is not None:
            self._metrics.inference.labels(**self._labels).observe(elapsed)
            self._metrics.batch_size.labels(**self._labels).observe(len(batch))
        offset = 0
        for pending, start, stop in parts:
            count = stop - start
            if not pending.future.done():
                self._deliver(pending, outputs, offset, start, count)
            offset += count

    def _log_fields(self, parts: list[tuple[_Pending, int, int]]) -> dict[str, object]:
        """Log fields of a batch: its model version and the ids of the requests whose frames it holds."""
        ids = list(dict.fromkeys(p.request_id for p, _, _ in parts if p.request_id is not None))
        return {"model": self.name, "version": self.version, "request_ids": ids}

    @staticmethod
    def _fail(parts: list[tuple[_Pending, int, int]], error: Exception) -> None:
        for pending, _, _ in parts:
            if not pending.future.done():
                pending.future.set_exception(error)

    @staticmethod
    def _deliver(pending: _Pending, outputs: Outputs, offset: int, start: int, count: int) -> None:
        if count == pending.size:  # the common case: a whole request in one batch, no copy
            pending.future.set_result({k: v[offset : offset + count] for k, v in outputs.items()})
            return
        for key, value in outputs.items():
            if key not in pending.outputs:
                pending.outputs[key] = np.empty((pending.size, *value.shape[1:]), dtype=value.dtype)
            pending.outputs[key][start : start + count] = value[offset : offset + count]
        pending.done += count
        if pending.done == pending.size:
            pending.future.set_result(pending.outputs)
