"""Benchmark the synthetic frame generator: render alone, then render + PNG + write per format.

    .venv/bin/python bench/bench_synth.py --size 64 --n 4096

Prints frames/s by wall clock and by this process's CPU time. The dev machine is shared, so the
load average is printed beside each figure: with other jobs running, wall-clock frames/s falls
while CPU-time frames/s (what one dedicated core would do) stays roughly put.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from training.synth import FAMILIES, render_batch, write_dataset


def timed(fn) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(wall seconds, process CPU seconds) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def report(label: str, frames: int, wall: float, cpu: float) -> None:
    load = os.getloadavg()[0]
    print(
        f"{label:<34} {frames:>6} frames  {frames / wall:>8.0f} frames/s wall  "
        f"{frames / cpu:>8.0f} frames/s cpu  (load {load:.1f} on {os.cpu_count()} cores)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--n", type=int, default=4096, help="frames per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="normal-render repeats (best reported)")
    parser.add_argument("--formats", default="dir,tar,parquet", help="formats for render+write ('' skips)")
    args = parser.parse_args()

    render_batch(0, 64, args.size)  # warm-up: imports, allocator
    runs = [timed(lambda: render_batch(1, args.n, args.size)) for _ in range(args.repeat)]
    # Best of each: the least disturbed run by the clock and by this process's CPU time.
    report(f"render normal {args.size}px", args.n, min(w for w, _ in runs), min(c for _, c in runs))

    per = max(1, args.n // len(FAMILIES))
    wall = cpu = 0.0
    for family in FAMILIES:
        w, c = timed(lambda family=family: render_batch(2, per, args.size, family))
        wall, cpu = wall + w, cpu + c
    report(f"render families {args.size}px (mixed)", per * len(FAMILIES), wall, cpu)

    for fmt in [f for f in args.formats.split(",") if f]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "synth"
            counts = {"n_normal": args.n, "n_val": 0, "n_test_normal": 0, "n_per_family": 0}
            w, c = timed(
                lambda fmt=fmt, out=out, counts=counts: write_dataset(
                    out, args.size, families=(), seed=3, fmt=fmt, progress=False, **counts
                )
            )
            # write_dataset also renders the contact sheet (one row here); it is a fixed cost.
            report(f"render+write {fmt} {args.size}px", args.n, w, c)
    print(f"numpy {np.__version__}, python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
