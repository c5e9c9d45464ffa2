"""Benchmark: frames/s of torch eager vs onnxruntime (CPU) for every score head, side by side.

For each head the same graph runs in torch (eval, inference mode) and in onnxruntime in the session
the service builds (`service.registry.make_session`), on the same uint8 frames, at batch 1, 8, 32
and 128. Repetitions are interleaved (torch, ort, torch, ort, ...) so load from other
processes hits both alike; each cell is the median over repetitions. The network architecture sets
the speed, not the weights, so dry-run runs (trained for one batch) are fine and are made when no
`--runs` are given.

`--variants` also times the fp16 and int8 graphs against fp32 in onnxruntime and, with `--data`
(a labelled folder, e.g. from `edgecase synth`), their AUROC on its test split.

    .venv/bin/python bench/bench_export.py                       # dry-run VAE + GAN at 64x64
    .venv/bin/python bench/bench_export.py --runs runs/vae runs/gan --json bench-export.json
    .venv/bin/python bench/bench_export.py --runs runs/vae --heads vae-elbo --variants --data data/synth
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.registry import make_session
from training.heads import available_heads, build_score_graph, run_kind
from training.onnx_graph import export_onnx
from training.runs import run_size
from training.variants import make_variant

# "wall": time.perf_counter. "cpu": time.process_time, the CPU seconds this process used: on a machine
# shared with other jobs it counts only the time we were running, so single-threaded comparisons stay
# fair however busy the machine is (with more threads it sums them: frames per CPU-second).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_call(fn: Callable[[], object], min_seconds: float, clock: Callable[[], float]) -> float:
    """Seconds per call, calling until `min_seconds` have passed on `clock` (at least once)."""
    calls, start = 0, clock()
    while True:
        fn()
        calls += 1
        elapsed = clock() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def side_by_side(
    runners: dict[str, Callable[[], object]],
    batch: int,
    repeats: int,
    min_seconds: float,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median frames/s of each runner, repetitions interleaved across runners."""
    for fn in runners.values():
        fn()  # warm-up: allocations, lazy init, onnxruntime's first-run planning
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            samples[name].append(batch / time_call(fn, min_seconds, clock))
    return {name: statistics.median(values) for name, values in samples.items()}


def torch_runner(graph: torch.nn.Module, frames: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return graph(frames)

    return run


def ort_runner(sess: Any, names: list[str], frames: np.ndarray) -> Callable[[], object]:
    return lambda: sess.run(names, {"frames": frames})


def make_runs(root: Path, size: int) -> list[Path]:
    """Dry-run VAE and GAN runs (one batch of training) on a few plain frames: the real architectures."""
    from PIL import Image

    from training.gan_train import GANConfig, train_gan
    from training.vae_train import VAEConfig, train_vae

    data = root / "frames"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(48):
        sky = np.linspace(200, 120, size // 2)[:, None, None] * np.ones((1, size, 3))
        road = np.full((size - size // 2, size, 3), 90.0)
        frame = np.concatenate([sky, road]) + rng.normal(0, 5, (size, size, 3))
        Image.fromarray(np.clip(frame, 0, 255).astype(np.uint8)).save(data / f"frame_{i:03d}.png")
    vae = train_vae(VAEConfig(size=size, dry_run=True, epochs=1), [str(data)], root / "vae")
    gan = train_gan(GANConfig(size=size, dry_run=True, epochs=1), [str(data)], root / "gan")
    return [Path(vae), Path(gan)]


def session(path: Path, threads: int) -> Any:
    """Exactly the service's session (service.registry.make_session), on CPU."""
    return make_session(path, ["CPUExecutionProvider"], threads)


def bench_heads(
    runs: list[Path],
    heads: list[str] | None,
    batches: list[int],
    repeats: int,
    min_seconds: float,
    threads: int,
    clock: Callable[[], float],
) -> list[dict[str, Any]]:
    rows = []
    work = [(run, head) for run in runs for head in available_heads(run) if heads is None or head in heads]
    with tempfile.TemporaryDirectory() as tmp:
        for run, head in tqdm(work, desc="heads", unit="head"):
            size = run_size(json.loads((run / "config.json").read_text()))
            graph = build_score_graph(run, head)
            path = Path(tmp) / f"{head}.onnx"
            names, _ = export_onnx(graph, path, size)
            sess = session(path, threads)
            rng = np.random.default_rng(0)
            for batch in batches:
                frames = rng.integers(0, 256, (batch, *size, 3), dtype=np.uint8)
                tensor = torch.from_numpy(frames)

                fps = side_by_side(
                    {"torch": torch_runner(graph, tensor), "ort": ort_runner(sess, names, frames)},
                    batch,
                    repeats,
                    min_seconds,
                    clock,
                )
                rows.append(
                    {
                        "kind": run_kind(run),
                        "head": head,
                        "size": str(size),
                        "batch": batch,
                        "torch_fps": fps["torch"],
                        "ort_fps": fps["ort"],
                        "ratio": fps["ort"] / fps["torch"],
                    }
                )
                tqdm.write(
                    f"{head:16s} batch {batch:4d}: torch {fps['torch']:9.1f} ort {fps['ort']:9.1f} frames/s "
                    f"ort/torch {fps['ort'] / fps['torch']:.2f}"
                )
    return rows


def bench_variants(
    runs: list[Path],
    heads: list[str] | None,
    data: Path | None,
    batch: int,
    repeats: int,
    min_seconds: float,
    threads: int,
    max_per_family: int,
    clock: Callable[[], float],
) -> list[dict[str, Any]]:
    """fp32 vs fp16 vs int8 in onnxruntime CPU: frames/s at `batch` and AUROC on labelled frames."""
    from training.data import load_labelled_frames
    from training.export_frames import auroc
    from training.onnx_graph import rel_diff, run_ort
    from training.variants import count_ops

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            size = run_size(json.loads((run / "config.json").read_text()))
            labelled = load_labelled_frames(data, size, max_per_family=max_per_family) if data else None
            for head in [h for h in available_heads(run) if heads is None or h in heads]:
                fp32 = Path(tmp) / f"{head}-fp32.onnx"
                names, _ = export_onnx(build_score_graph(run, head), fp32, size)
                paths = {"fp32": fp32}
                for variant in ("fp16", "int8"):
                    paths[variant] = Path(tmp) / f"{head}-{variant}.onnx"
                    make_variant(fp32, paths[variant], variant)  # type: ignore[arg-type]
                sessions = {v: session(p, threads) for v, p in paths.items()}
                frames = np.random.default_rng(0).integers(0, 256, (batch, *size, 3), dtype=np.uint8)
                runners = {v: ort_runner(sess, names, frames) for v, sess in sessions.items()}
                fps = side_by_side(runners, batch, repeats, min_seconds, clock)
                scores = {}
                if labelled is not None:
                    images, families, _, _ = labelled
                    scores = {v: run_ort(s, images, 64)["score"] for v, s in sessions.items()}
                for variant in paths:
                    row: dict[str, Any] = {
                        "head": head,
                        "variant": variant,
                        "batch": batch,
                        "ort_fps": fps[variant],
                        "speedup": fps[variant] / fps["fp32"],
                        "ops": count_ops(paths[variant]),
                    }
                    if scores:
                        fam = np.array(families)
                        normal = scores[variant][fam == "normal"]
                        per_family = {
                            f: auroc(normal, scores[variant][fam == f])
                            for f in sorted(set(families) - {"normal"})
                        }
                        row["mean_auroc"] = float(np.mean(list(per_family.values())))
                        row["max_rel_diff_vs_fp32"] = float(rel_diff(scores["fp32"], scores[variant]).max())
                    rows.append(row)
                    tqdm.write(json.dumps({k: v for k, v in row.items() if k != "ops"}))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| head | batch | torch frames/s | onnxruntime frames/s | ort/torch |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['head']} | {r['batch']} | {r['torch_fps']:.1f} | {r['ort_fps']:.1f} | {r['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", nargs="+", type=Path, help="run dirs (default: fresh dry runs)")
    parser.add_argument("--size", type=int, default=64, help="frame size of the dry runs")
    parser.add_argument("--heads", nargs="+", help="only these heads")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions per cell")
    parser.add_argument("--min-seconds", type=float, default=0.3, help="time per measurement")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads for torch and onnxruntime (0: their defaults, one per core)",
    )
    parser.add_argument("--variants", action="store_true", help="also time fp16/int8 (and AUROC with --data)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall or process CPU time")
    parser.add_argument("--only-variants", action="store_true", help="skip the torch vs onnxruntime table")
    parser.add_argument("--data", type=Path, help="labelled folder for the variants' AUROC")
    parser.add_argument("--max-per-family", type=int, default=100)
    parser.add_argument("--json", type=Path, help="write all rows here")
    args = parser.parse_args(argv)
    if args.threads:  # the same thread budget for both sides
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]

    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs or make_runs(Path(tmp), args.size)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"onnxruntime intra-op threads {args.threads} (0: one per core); {args.clock} clock"
        )
        rows = []
        if not args.only_variants:
            rows = bench_heads(
                runs, args.heads, args.batches, args.repeats, args.min_seconds, args.threads, clock
            )
            print(markdown(rows))
        result: dict[str, Any] = {"heads": rows}
        if args.variants or args.only_variants:
            result["variants"] = bench_variants(
                runs,
                args.heads,
                args.data,
                32,
                args.repeats,
                args.min_seconds,
                args.threads,
                args.max_per_family,
                clock,
            )
    slower = [r for r in rows if r["ratio"] < 1.0]
    if slower:
        print("onnxruntime slower than torch at: " + ", ".join(f"{r['head']}@{r['batch']}" for r in slower))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
