"""Read and decode ahead of inference: the part of batch scoring that keeps the session busy.

A reader thread walks the shards and cuts their records into batches; each batch's bytes go to a
decode pool (threads by default: Pillow releases the GIL while it decodes and resizes, and threads
cost no pickling; a process pool is the alternative, measured in docs/benchmarks.md), and the
batches come back to the caller in reading order, decoded, while the next ones are being read and
decoded. The caller runs the one onnxruntime session on them, so reading, decoding and inference
overlap. At most ``depth`` batches are in flight, which bounds memory.

Decoding is ``contract.frames.decode_resized``, the one bytes-to-model-input path (with JPEG
draft mode), at the manifest's H x W by its resize rule, so a frame scores here as it does in the
service.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Literal

import numpy as np
import numpy.typing as npt

from contract.frames import DEFAULT_MAX_PIXELS, FrameSize, decode_resized
from contract.readers import Record
from contract.shards import Shard, shard_records

PoolKind = Literal["thread", "process"]
POOL_KINDS: tuple[str, ...] = ("thread", "process")


@dataclass
class Decoded:
    """A batch's decoded frames (None where decoding failed, with the reason in ``errors``)."""

    images: list[npt.NDArray[np.uint8] | None]
    errors: list[str | None]
    seconds: float


def decode_batch(
    datas: Sequence[bytes | None], size: FrameSize, max_pixels: int = DEFAULT_MAX_PIXELS, *, rule: str
) -> Decoded:
    """Decode and resize one batch to ``size`` by ``rule`` (runs in a pool worker; module-level so it
    pickles)."""
    started = time.perf_counter()
    images: list[npt.NDArray[np.uint8] | None] = []
    errors: list[str | None] = []
    for data in datas:
        if data is None:
            images.append(None)
            errors.append(None)  # the record already says why
            continue
        try:
            images.append(decode_resized(data, size, rule=rule, max_pixels=max_pixels))
            errors.append(None)
        except ValueError as exc:  # FrameDecodeError and anything ValueError-shaped
            images.append(None)
            errors.append(str(exc))
    return Decoded(images, errors, time.perf_counter() - started)


@dataclass
class Item:
    """What the pipeline yields: a decoded batch of a shard, or (``records`` None) the shard's end."""

    shard: Shard
    records: list[Record] | None
    decoded: Decoded | None = None


@dataclass
class StageTimes:
    """Seconds of work per stage (summed over workers for decode), for frames/s per stage."""

    seconds: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "decode": 0.0})

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


def make_pool(kind: PoolKind, workers: int) -> Executor:
    if kind == "process":
        # forkserver: workers never inherit onnxruntime's threads (fork after threads is unsafe).
        return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("forkserver"))
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")


_END = object()


def decoded_batches(
    shards: Sequence[Shard],
    *,
    size: FrameSize,
    rule: str,
    batch_size: int,
    pool: Executor,
    depth: int,
    times: StageTimes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    records_of: Callable[[Shard], Iterator[Record]] = shard_records,
) -> Iterator[Item]:
    """Decoded batches of ``shards`` in reading order (model inputs of ``size`` by ``rule``), an end
    ``Item`` after each shard.

    A shard's file-level error arrives as a ``whole_source`` record in its last batch. Closing the
    iterator (or an exception in the caller) stops the reader thread within one batch.
    """
    pending: queue.Queue[tuple[Item, Future[Decoded] | None] | BaseException | object] = queue.Queue(depth)
    stop = threading.Event()

    def put(entry: tuple[Item, Future[Decoded] | None] | BaseException | object) -> bool:
        while not stop.is_set():
            try:
                pending.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def submit(shard: Shard, batch: list[Record]) -> bool:
        future = pool.submit(decode_batch, [record.data for record in batch], size, max_pixels, rule=rule)
        return put((Item(shard, batch), future))

    def read() -> None:
        try:
            for shard in shards:
                batch: list[Record] = []
                records = records_of(shard)
                started = time.perf_counter()
                for record in records:
                    batch.append(record)
                    if len(batch) == batch_size:
                        times.add("read", time.perf_counter() - started)
                        if not submit(shard, batch):
                            return
                        batch, started = [], time.perf_counter()
                times.add("read", time.perf_counter() - started)
                if batch and not submit(shard, batch):
                    return
                if not put((Item(shard, None), None)):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    reader = threading.Thread(target=read, name="batch-reader", daemon=True)
    reader.start()
    try:
        while True:
            entry = pending.get()
            if entry is _END:
                return
            if isinstance(entry, BaseException):
                raise entry
            assert isinstance(entry, tuple)
            item, future = entry
            if future is not None:
                item.decoded = future.result()
                times.add("decode", item.decoded.seconds)
            yield item
    finally:
        stop.set()
        reader.join(timeout=30)
