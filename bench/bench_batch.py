"""Benchmark batch scoring: `edgecase score` against in-process decode + onnxruntime, side by side.

    .venv/bin/python bench/bench_batch.py --frames 20000 --hd-frames 2000 --size 256x144

The reference is the simplest correct loop at the same batch size: read a shard's records, decode
each with ``decode_resized``, ``session.run`` every ``--batch-size`` frames, one thread. The
contender is the real command (`edgecase score`, a subprocess, its scoring time from
``_summary.json``), with its decode pool in threads and in processes. Runs are interleaved
(reference, threads, processes, reference, ...) so both see the same machine load, and the ratio
is taken per round; the median round is reported. Two data sets: synth frames at ``--size`` (W x H,
default 256x144) in tar shards, and the same frames upscaled to ``--hd-size`` (default 1920x1080)
JPEG (camera-sized), where Pillow's JPEG draft mode should show: the reference is also timed with
draft decoding off. Every frame is resized to the model's input by its manifest's resize rule.

The model is a real exported VAE (`edgecase train vae --dry-run` then `edgecase export --head
vae-elbo`: the weights are untrained, the graph and its cost are the real ones) at ``--size``, made
once under ``--work`` unless ``--repo``/``--model`` name one. The machine is shared: the load
average is printed with every figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contract.frames import FrameSize, decode_frame, decode_resized, frame_size, resize_frame  # noqa: E402
from contract.shards import list_shards, shard_records  # noqa: E402
from service.registry import ModelRegistry  # noqa: E402


def cli(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "edgecase.cli", *args], check=True, env=env, cwd=ROOT)


def size_flag(size: FrameSize) -> str:
    """``--size`` as the commands take it: ``64`` for a square, ``256x144`` (W x H) otherwise."""
    return str(size.width) if size.height == size.width else str(size)


def ensure_model(work: Path, size: FrameSize) -> tuple[Path, str]:
    repo, name = work / f"models-{size}", "vae-elbo"
    if (repo / name).is_dir():
        return repo, name
    data, run = work / f"train-data-{size}", work / f"run-vae-{size}"
    sizes = ["--n-normal", "512", "--n-val", "256", "--n-test-normal", "128", "--n-per-family", "8"]
    cli("synth", "--out", str(data), "--size", size_flag(size), *sizes, "--format", "dir", "--no-progress")
    cli("train", "vae", "--data", str(data), "--out", str(run), "--size", size_flag(size), "--dry-run")
    cli("export", str(run), "--head", "vae-elbo", "--repo", str(repo))
    return repo, name


def ensure_frames(work: Path, frames: int, size: FrameSize) -> Path:
    """``frames`` synth normals of ``size`` in tar shards (synth's train split)."""
    out = work / f"frames{size}-{frames}"
    if not (out / "done").exists():
        sizes = ["--n-normal", str(frames), "--n-val", "1", "--n-test-normal", "1", "--n-per-family", "1"]
        cli("synth", "--out", str(out), "--size", size_flag(size), *sizes, "--format", "tar", "--no-progress")
        (out / "done").write_text("ok\n")
    return out


def ensure_hd(work: Path, small: Path, frames: int, shard_size: int, hd: FrameSize) -> Path:
    """The first ``frames`` synth frames upscaled to ``hd`` (bicubic) and saved as JPEG (q 90)."""
    out = work / f"frames{hd}-{frames}-from-{small.name}"
    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    records = (r for s in list_shards(sorted(small.glob("train-*.tar"))) for r in shard_records(s))
    for shard in range((frames + shard_size - 1) // shard_size):
        with tarfile.open(out / f"hd-{shard:05d}.tar", "w") as tar:
            for _, record in zip(range(min(shard_size, frames - shard * shard_size)), records, strict=False):
                assert record.data is not None
                image = Image.open(io.BytesIO(record.data)).convert("RGB")
                buffer = io.BytesIO()
                image.resize((hd.width, hd.height), Image.Resampling.BICUBIC).save(
                    buffer, format="JPEG", quality=90
                )
                info = tarfile.TarInfo(f"{record.key}.jpg")
                info.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(info, buffer)
    (out / "done").write_text("ok\n")
    return out


def sequential(
    repo: Path, name: str, shards: list[Path], batch_size: int, draft: bool = True
) -> tuple[int, float, float]:
    """The reference: read, decode, session.run every batch_size frames. (frames, wall s, CPU s).

    A fresh session each time, as the command has: both pay onnxruntime's first-run set-up.
    """
    model = ModelRegistry(repo).load(name)
    size, rule = model.input_size, model.resize_rule

    def decode(data: bytes) -> np.ndarray:
        if draft:
            return decode_resized(data, size, rule=rule)
        return resize_frame(decode_frame(data), size, rule)

    started, cpu, frames, batch = time.perf_counter(), time.process_time(), 0, []
    for shard in list_shards(shards):
        for record in shard_records(shard):
            assert record.data is not None
            batch.append(decode(record.data))
            if len(batch) == batch_size:
                model.score(np.stack(batch))
                frames, batch = frames + len(batch), []
    if batch:
        model.score(np.stack(batch))
        frames += len(batch)
    return frames, time.perf_counter() - started, time.process_time() - cpu


def command(
    repo: Path, name: str, shards: list[Path], out: Path, batch_size: int, pool: str, workers: int
) -> tuple[int, float, float]:
    """`edgecase score` in a subprocess: (frames, scoring s, scoring CPU s), both from _summary.json.

    The CPU time is the command's own over its scoring, all threads, without its imports and model
    load (the reference's excludes those too). A process pool's workers are not in it: NaN then.
    """
    flags = ["--batch-size", str(batch_size), "--decode-pool", pool, "--workers", str(workers)]
    flags.append("--no-progress")
    cli("score", "--repo", str(repo), "--model", name, "--data", *map(str, shards), "--out", str(out), *flags)
    summary = json.loads((out / "_summary.json").read_text())
    cpu = float(summary["cpu_seconds"]) if pool == "thread" else float("nan")
    return int(summary["frames"]), float(summary["seconds"]), cpu


def rounds(label: str, repeat: int, runs: dict[str, Callable[[], tuple[int, float, float]]]) -> None:
    """Interleave the runs ``repeat`` times; print each, then the median ratios to the reference."""
    ratios: dict[str, list[tuple[float, float]]] = {key: [] for key in runs if key != "reference"}
    rates: dict[str, list[tuple[float, float]]] = {key: [] for key in runs}
    for r in range(repeat):
        this: dict[str, tuple[float, float]] = {}
        for key, run in runs.items():
            frames, wall, cpu = run()
            this[key] = (frames / wall, frames / cpu)
            rates[key].append(this[key])
            load = os.getloadavg()[0]
            print(f"  {label} round {r + 1} {key:<26} {frames:>6} frames {frames / wall:>7.1f} frames/s "
                  f"{frames / cpu:>7.1f} frames/CPU-s  (load {load:.1f})", flush=True)  # fmt: skip
        for key in ratios:
            ref = this["reference"]
            ratios[key].append((this[key][0] / ref[0], this[key][1] / ref[1]))
    for key, values in rates.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"{label}: {key:<26} median {wall:7.1f} frames/s, {cpu:7.1f} frames/CPU-s", flush=True)
    for key, pairs in ratios.items():
        wall = statistics.median(p[0] for p in pairs)
        cpu = statistics.median(p[1] for p in pairs)
        each = ", ".join(f"{p[0]:.2f}" for p in pairs)
        print(f"{label}: {key} / reference = {wall:.2f} wall ({each}), {cpu:.2f} per CPU-s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", type=Path, default=ROOT / "runs" / "bench_batch", help="data, model, outputs"
    )
    parser.add_argument("--frames", type=int, default=20000, help="synth frames in tar shards")
    parser.add_argument("--size", default="256x144", help="synth frames and the made model, WxH (256x144)")
    parser.add_argument("--hd-frames", type=int, default=2000, help="camera-sized JPEG frames (0 skips)")
    parser.add_argument("--hd-size", default="1920x1080", help="camera-sized frames, WxH (1920x1080)")
    parser.add_argument("--shard-size", type=int, default=500, help="camera-sized frames per tar shard")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="decode workers of the command"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--repo", type=Path, default=None)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()

    size, hd_size = frame_size(args.size), frame_size(args.hd_size)
    args.work.mkdir(parents=True, exist_ok=True)
    repo, name = (args.repo, args.model) if args.repo and args.model else ensure_model(args.work, size)
    model = ModelRegistry(repo).load(name)
    print(f"model {name}/{model.version} (input {model.input_size}, {model.resize_rule}) on "
          f"{model.providers[0]}; frames {size} and {hd_size}; batch {args.batch_size}; "
          f"{os.cpu_count()} cores; load {os.getloadavg()}", flush=True)  # fmt: skip
    small = ensure_frames(args.work, args.frames, size)
    small_shards = sorted(small.glob("train-*.tar"))
    out = args.work / "out"
    b, w = args.batch_size, args.workers
    rounds(str(size), args.repeat, {
        "reference": lambda: sequential(repo, name, small_shards, b),
        "edgecase score threads": lambda: command(repo, name, small_shards, out / "t", b, "thread", w),
        "edgecase score processes": lambda: command(repo, name, small_shards, out / "p", b, "process", w),
    })  # fmt: skip
    if args.hd_frames:
        hd = ensure_hd(args.work, small, args.hd_frames, args.shard_size, hd_size)
        hd_shards = sorted(hd.glob("hd-*.tar"))
        rounds(str(hd_size), args.repeat, {
            "reference": lambda: sequential(repo, name, hd_shards, b),
            "reference, draft off": lambda: sequential(repo, name, hd_shards, b, draft=False),
            "edgecase score threads": lambda: command(repo, name, hd_shards, out / "ht", b, "thread", w),
            "edgecase score processes": lambda: command(repo, name, hd_shards, out / "hp", b, "process", w),
        })  # fmt: skip
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
