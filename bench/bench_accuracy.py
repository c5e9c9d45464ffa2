"""Accuracy benchmark: every score head and pixel baseline, per edge-case family (issue 3, item 7).

(a) ``synthetic``: ``edgecase synth`` (fixed seed, N training normals) -> ``edgecase train vae`` and
    ``edgecase train gan`` with default settings (or ``--minutes`` each) -> ``edgecase ensemble`` of
    the two -> every head of both runs, the ensemble's head and the three pixel baselines scored on
    the synth test split -> AUROC per family, mean over
    families, AUPR, FPR@95%TPR and detection rate at the calibrated threshold. Ablation rows per
    kind score the patch head with *randomly initialised* early layers (are trained features
    needed?) and with the settings the validation protocol did not pick (per-cell z-scores, pooling),
    the combined head without its DRAEM-style seg component, and the ensemble's head over all its
    candidates (without the protocol's component selection).
(b) ``digits``: scikit-learn's handwritten digits (8x8 grey, 1,797 images), upsampled to 32x32 RGB by
    the one resize rule (contract.frames.resize_frame). One-class protocol: for each digit, 60% of its
    images train, 15% validate (early stopping, calibration), 25% are the normal test frames; the
    test frames of every other digit are the anomalies. AUROC (normal digit vs all others) of each
    head and baseline, and the mean over the ten digits.

Each part prints a Markdown table and writes it (and a JSON with every number) under ``--out``; the
synthetic part also keeps every scorer's test-frame scores (``scores_<size>.npz``).

    python bench/bench_accuracy.py synthetic --size 64 --n-normal 8000 --out bench-out/acc64
    python bench/bench_accuracy.py digits --minutes 1 --out bench-out/digits
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench_accuracy")

TARGET_FAMILIES = ("fog", "rain", "pedestrian", "animal", "construction")


def edgecase(*args: str) -> None:
    """Run an ``edgecase`` subcommand in a subprocess (its own progress bars), failing loudly."""
    cmd = [sys.executable, "-m", "edgecase.cli", *args]
    log.info("$ edgecase %s", " ".join(args))
    subprocess.run(cmd, check=True)


def train(kind: str, data: Path, out: Path, minutes: float | None, extra: list[str]) -> Path:
    """Train one run with default settings (unless ``minutes`` or ``extra`` say otherwise)."""
    if (out / "model.pt").is_file():
        log.info("reusing %s", out)
        return out
    args = ["train", kind, "--data", str(data), "--out", str(out), "--seed", "0", *extra]
    if minutes is not None:
        args += ["--max-minutes", str(minutes)]
    edgecase(*args)
    return out


# Ablations of the patch head: are trained early layers needed, and does per-cell normalisation help?
ABLATIONS = {
    "random init": {"random_init": True},
    "per-cell z-scores": {"cell_norm": True},
    "3x3 pooling, per-cell z-scores": {"pool": 3, "cell_norm": True},
    "small bank": {"bank_frames": 1500, "max_candidates": 2048, "bank_size": 128},
    "context features": {"context": 1},
}


def scored_variant(name: str, graph: Any, run_dir: Path, frames: np.ndarray, families: list[str]) -> Any:
    """A graph that is not a registered head (an ablation), scored like one: calibrated on the run's
    validation normals, evaluated per family, with its protocol AUROC on both corruption sets."""
    from training.calibrate import calibrate_scores
    from training.evaluate import ScorerResult, evaluate_scores, score_with_maps
    from training.protocol import pseudo_auroc
    from training.runs import run_normals

    val = run_normals(run_dir, "val")
    calibration = calibrate_scores(score_with_maps(graph, val)[0], head=name)
    scores, _ = score_with_maps(graph, frames, desc=name)
    result = ScorerResult(name, "ablation", scores, calibration)
    result.metrics = evaluate_scores(scores, families, calibration.threshold)
    for corruptions in ("patches", "heldout"):
        result.metrics[f"protocol_{corruptions}"] = pseudo_auroc(graph, val, name, corruptions)
    return result


def ablation_scores(run_dir: Path, kind: str, frames: np.ndarray, families: list[str], variant: str) -> Any:
    """The patch head built with one ablation setting, calibrated like the others; a ScorerResult."""
    from training.heads.patch import build_patch_graph

    graph = build_patch_graph(run_dir, kind, **ABLATIONS[variant])
    return scored_variant(f"{kind}-patch ({variant})", graph, run_dir, frames, families)


def combo_without_seg(run_dir: Path, kind: str, frames: np.ndarray, families: list[str]) -> Any:
    """The combined head without its seg component (does the DRAEM-style head earn its place?)."""
    from training.heads.combo import DEFAULT_COMPONENTS, fit_combo_head, load_combo_graph

    components = tuple(c for c in DEFAULT_COMPONENTS[kind] if c != f"{kind}-seg")
    fit_combo_head(run_dir, kind, components)
    graph = load_combo_graph(run_dir, kind, components)
    return scored_variant(f"{kind}-combo (without seg)", graph, run_dir, frames, families)


def ensemble_without_selection(run_dir: Path, frames: np.ndarray, families: list[str]) -> Any:
    """The ensemble's head over all nine candidates (what the component selection buys)."""
    from training.ensemble import member_runs
    from training.heads.combo import DEFAULT_COMPONENTS, component_graphs, fitted_combo
    from training.runs import load_config

    name = "ensemble-combo (all candidates)"
    sources = [(m, h) for m in member_runs(run_dir) for h in DEFAULT_COMPONENTS[load_config(m)["kind"]]]
    names, graphs = component_graphs(sources, fit=True)
    graph = fitted_combo(names, graphs, run_dir, run_dir / "banks" / "ensemble-combo-all.json", label=name)
    return scored_variant(name, graph, run_dir, frames, families)


def seg_protocol_table(run_dirs: dict[str, Path], results: list[Any], ensemble: Path | None) -> list[str]:
    """Markdown lines: the seg heads and the combos with and without them on both corruption sets.

    The seg net trains on blob-shaped pastes, close kin of the ``patches`` set; ``heldout`` (light
    changes, scars, global changes) is what no head trained on, so it decides whether seg joins a combo.
    """
    from training.heads import build_score_graph
    from training.protocol import pseudo_auroc
    from training.runs import run_normals

    lines = ["| head | protocol AUROC, patches | protocol AUROC, held-out |", "|---|---:|---:|"]
    for kind, run in run_dirs.items():
        val = run_normals(run, "val")
        for head in (f"{kind}-seg", f"{kind}-combo"):
            graph = build_score_graph(run, head)
            values = [pseudo_auroc(graph, val, head, c) for c in ("patches", "heldout")]
            lines.append(f"| `{head}` | {values[0]:.3f} | {values[1]:.3f} |")
        for r in results:
            if r.name == f"{kind}-combo (without seg)":
                m = r.metrics
                lines.append(f"| `{r.name}` | {m['protocol_patches']:.3f} | {m['protocol_heldout']:.3f} |")
    if ensemble is not None:
        val = run_normals(ensemble, "val")
        graph = build_score_graph(ensemble, "ensemble-combo")
        values = [pseudo_auroc(graph, val, "ensemble-combo", c) for c in ("patches", "heldout")]
        lines.append(f"| `ensemble-combo` | {values[0]:.3f} | {values[1]:.3f} |")
        for r in results:
            if r.name == "ensemble-combo (all candidates)":
                m = r.metrics
                lines.append(f"| `{r.name}` | {m['protocol_patches']:.3f} | {m['protocol_heldout']:.3f} |")
    return lines


def protocol_table(run_dirs: dict[str, Path], results: list[Any]) -> list[str]:
    """Markdown lines: protocol AUROC of each patch head and its ablations (how settings are chosen)."""
    from training.heads import build_score_graph
    from training.protocol import pseudo_auroc
    from training.runs import run_normals

    lines = ["| patch head | protocol AUROC, patches | protocol AUROC, held-out |", "|---|---:|---:|"]
    for kind, run in run_dirs.items():
        head = f"{kind}-patch"
        graph, val = build_score_graph(run, head), run_normals(run, "val")
        values = [pseudo_auroc(graph, val, head, c) for c in ("patches", "heldout")]
        lines.append(f"| `{head}` | {values[0]:.3f} | {values[1]:.3f} |")
        for r in results:
            if r.name.startswith(f"{head} (") and "protocol_patches" in r.metrics:
                m = r.metrics
                lines.append(f"| `{r.name}` | {m['protocol_patches']:.3f} | {m['protocol_heldout']:.3f} |")
    return lines


def family_table(results: list[Any], families: list[str]) -> str:
    """Markdown: one row per scorer, mean AUROC over families, then AUROC per family."""
    names = sorted(set(families) - {"normal"})
    header = "| scorer | mean AUROC | " + " | ".join(names) + " | overall AUPR | FPR@95TPR | FPR@thr |"
    lines = [header, "|" + "---|" * (len(names) + 5)]
    for r in sorted(results, key=lambda r: -r.metrics["mean_auroc"]):
        fam = r.metrics["families"]
        o = r.metrics["overall"]
        cells = [f"{fam[f]['auroc']:.3f}" for f in names]
        lines.append(
            f"| `{r.name}` | **{r.metrics['mean_auroc']:.3f}** | "
            + " | ".join(cells)
            + f" | {o['aupr']:.3f} | {o['fpr_at_95tpr']:.3f} | {o['false_positive_rate']:.3f} |"
        )
    return "\n".join(lines)


def detection_table(results: list[Any], families: list[str]) -> str:
    """Markdown: detection rate per family at the calibrated threshold (target FPR 1%)."""
    names = sorted(set(families) - {"normal"})
    lines = ["| scorer | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for r in sorted(results, key=lambda r: -r.metrics["mean_auroc"]):
        fam = r.metrics["families"]
        lines.append(f"| `{r.name}` | " + " | ".join(f"{fam[f]['detection_rate']:.2f}" for f in names) + " |")
    return "\n".join(lines)


def target_check(results: list[Any]) -> list[str]:
    """The issue's targets for the best head, each marked met or missed."""
    heads = [r for r in results if r.source == "head"]
    baselines = [r for r in results if r.source == "baseline"]
    best = max(heads, key=lambda r: r.metrics["mean_auroc"])
    fam = best.metrics["families"]
    lines = [f"Best head: `{best.name}`"]

    def mark(ok: bool) -> str:
        return "met" if ok else "MISSED"

    mean = best.metrics["mean_auroc"]
    lines.append(f"- mean AUROC >= 0.90: {mean:.3f} ({mark(mean >= 0.9)})")
    worst = min(fam, key=lambda f: fam[f]["auroc"])
    lines.append(
        f"- every family >= 0.6: worst {worst} {fam[worst]['auroc']:.3f} ({mark(fam[worst]['auroc'] >= 0.6)})"
    )
    for f in ("fog", "rain"):
        if f in fam:
            lines.append(f"- {f} >= 0.9: {fam[f]['auroc']:.3f} ({mark(fam[f]['auroc'] >= 0.9)})")
    for f in ("pedestrian", "animal", "construction"):
        if f in fam and baselines:
            top = max(b.metrics["families"][f]["auroc"] for b in baselines)
            lines.append(
                f"- {f} above every baseline: {fam[f]['auroc']:.3f} vs best baseline {top:.3f} "
                f"({mark(fam[f]['auroc'] > top)})"
            )
    from training.heads import default_head

    # Issue 12's targets are for the head the protocol builds, not the one the test split favours.
    served = next((r for r in heads if r.name == default_head("ensemble")), best)
    lines += ["", *operating_point_check(served)]
    if served is not best:
        lines.append(
            f"- (`{best.name}` has the highest mean on the test split, {mean:.3f}: a choice made on the "
            f"test frames, so the check above is for `{served.name}`, the head `edgecase ensemble` builds)"
        )
    return lines


SMALL_OBJECTS = ("pedestrian", "animal", "construction")


def operating_point_check(best: Any) -> list[str]:
    """Issue 12's targets (wide frames): AUROC *and* detection at the calibrated 1% threshold."""
    fam, overall = best.metrics["families"], best.metrics["overall"]

    def mark(ok: bool) -> str:
        return "met" if ok else "MISSED"

    mean = best.metrics["mean_auroc"]
    lines = [
        f"Operating-point targets (issue 12) for `{best.name}`:",
        f"- mean AUROC >= 0.95: {mean:.3f} ({mark(mean >= 0.95)})",
    ]
    for f in SMALL_OBJECTS:
        if f in fam:
            auroc, det = fam[f]["auroc"], fam[f]["detection_rate"]
            ok = mark(auroc >= 0.9 and det >= 0.5)
            lines.append(f"- {f} AUROC >= 0.90 and detection >= 0.5: {auroc:.3f}, {det:.2f} ({ok})")
    others = [f for f in fam if f not in SMALL_OBJECTS]
    if others:
        worst = min(others, key=lambda f: fam[f]["auroc"])
        auroc = fam[worst]["auroc"]
        lines.append(f"- every other family >= 0.95: worst {worst} {auroc:.3f} ({mark(auroc >= 0.95)})")
    fpr, target = overall["false_positive_rate"], best.calibration.target_fpr
    ok = mark(abs(fpr - target) <= 0.005)
    lines.append(f"- realised FPR on test normals within 0.5 points of {target:.0%}: {fpr:.2%} ({ok})")
    return lines


def heads_to_score(run_dir: Path, skip: list[str]) -> list[str] | None:
    """The run's heads less ``skip`` (None: all of them)."""
    if not skip:
        return None
    from training.heads import available_heads

    return [h for h in available_heads(run_dir) if h not in skip]


def run_synthetic(args: argparse.Namespace) -> int:
    """Part (a): synth -> train VAE and GAN -> evaluate every head and baseline per family."""
    from training.evaluate import evaluate_run

    out = Path(args.out)
    data = out / "data"
    if not (data / "labels.csv").is_file():
        edgecase(
            "synth",
            "--out",
            str(data),
            "--size",
            str(args.size),
            "--n-normal",
            str(args.n_normal),
            "--seed",
            str(args.seed),
            *args.synth_args,
        )
    timings: dict[str, float] = {}
    results: list[Any] = []
    families: list[str] = []
    runs: dict[str, Path] = {}
    for kind in args.kinds:
        start = time.perf_counter()
        run = train(kind, data, out / kind, args.minutes, ["--size", str(args.size), *args.train_args])
        timings[f"train {kind} (s)"] = time.perf_counter() - start
        runs[kind] = run
        start = time.perf_counter()
        kind_results, families, frames, _ = evaluate_run(
            run,
            data,
            heads=heads_to_score(run, args.skip_heads),
            max_per_family=args.max_per_family,
            baselines=kind == args.kinds[0],
        )
        results += kind_results
        if args.ablation:
            results.extend(ablation_scores(run, kind, frames, families, v) for v in ABLATIONS)
            results.append(combo_without_seg(run, kind, frames, families))
        timings[f"evaluate {kind} (s)"] = time.perf_counter() - start
    ensemble_dir = None
    if set(runs) == {"vae", "gan"}:
        start = time.perf_counter()
        ensemble = ensemble_dir = out / "ensemble"
        edgecase("ensemble", str(runs["vae"]), str(runs["gan"]), "--out", str(ensemble))
        ens_results, _, frames, _ = evaluate_run(
            ensemble, data, max_per_family=args.max_per_family, baselines=False
        )
        results += ens_results
        if args.ablation:
            results.append(ensemble_without_selection(ensemble, frames, families))
        timings["ensemble (s)"] = time.perf_counter() - start
    counts = {f: families.count(f) for f in sorted(set(families))}
    text = "\n".join(
        [
            f"### Synthetic {args.size} ({args.n_normal} training normals, seed {args.seed})",
            "",
            "Test frames: " + ", ".join(f"{f} {c}" for f, c in counts.items()),
            "",
            "AUROC per family (each family vs the normal test frames):",
            "",
            family_table(results, families),
            "",
            "Detection rate at the calibrated threshold (target FPR 1% on validation normals):",
            "",
            detection_table(results, families),
            "",
            *target_check(results),
            "",
            *(
                ["Validation protocol of the patch-head settings (no edge-case family):", ""]
                + protocol_table(runs, results)
                + ["", "Validation protocol of the seg heads and the combos (no edge-case family):", ""]
                + seg_protocol_table(runs, results, ensemble_dir)
                + [""]
                if args.ablation
                else []
            ),
            "Timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        ]
    )
    print(text)
    (out / f"accuracy_{args.size}.md").write_text(text + "\n")
    numbers = {r.name: {"source": r.source, **r.metrics} for r in results}
    (out / f"accuracy_{args.size}.json").write_text(
        json.dumps({"counts": counts, "timings": timings, "scorers": numbers}, indent=1)
    )
    # Every scorer's test-frame scores, so a question about a combination needs no re-scoring.
    np.savez_compressed(
        out / f"scores_{args.size}.npz", families=np.array(families), **{r.name: r.scores for r in results}
    )
    return 0


def write_digit_folder(root: Path, digit: int, seed: int) -> Path:
    """One-class labelled folder for ``digit``: train/val/test normals, other digits as test anomalies."""
    from sklearn.datasets import load_digits

    from contract.frames import encode_png, resize_frame
    from contract.labels import LabelRow, write_labels

    if (root / "labels.csv").is_file():
        return root
    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    rng = np.random.default_rng(seed)
    rows = []
    normal = rng.permutation(np.flatnonzero(digits.target == digit))
    n_train, n_val = int(0.6 * len(normal)), int(0.15 * len(normal))
    splits = {
        "train": normal[:n_train],
        "val": normal[n_train : n_train + n_val],
        "test": normal[n_train + n_val :],
    }
    for other in range(10):
        if other != digit:  # the same 25% share of every other digit: its "test" images
            idx = rng.permutation(np.flatnonzero(digits.target == other))
            splits[f"digit{other}"] = idx[int(0.75 * len(idx)) :]
    for split, indices in splits.items():
        family = "normal" if split in ("train", "val", "test") else split
        real_split = split if family == "normal" else "test"
        for i in indices:
            rgb = np.repeat(images[i][:, :, None], 3, axis=2)
            frame = resize_frame(rgb, 32)
            key = f"{real_split}/{family}/{family}_{i:06d}"
            path = root / f"{key}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png(frame))
            rows.append(LabelRow(key, f"{key}.png", real_split, family, 0.0 if family == "normal" else 1.0))
    write_labels(root, rows)
    return root


def run_digits(args: argparse.Namespace) -> int:
    """Part (b): one-class digits, all ten digits, overall AUROC of each head and baseline."""
    from training.evaluate import evaluate_run

    out = Path(args.out)
    table: dict[str, dict[int, float]] = {}
    for digit in args.digits:
        root = out / f"digit{digit}"
        data = write_digit_folder(root / "data", digit, args.seed)
        for kind in args.kinds:
            run = train(kind, data, root / kind, args.minutes, ["--size", "32", *args.train_args])
            results, _, _, _ = evaluate_run(run, data, baselines=kind == args.kinds[0])
            for r in results:
                table.setdefault(r.name, {})[digit] = r.metrics["overall"]["auroc"]
        log.info("digit %d: %s", digit, {k: round(v[digit], 3) for k, v in table.items() if digit in v})
    digits = list(args.digits)
    lines = [
        "### Handwritten digits, one-class (sklearn load_digits, 32x32 RGB)",
        "",
        "AUROC of the normal digit's test images vs every other digit's test images:",
        "",
        "| scorer | mean | " + " | ".join(str(d) for d in digits) + " |",
        "|" + "---|" * (len(digits) + 2),
    ]
    for name, by_digit in sorted(table.items(), key=lambda kv: -np.mean(list(kv[1].values()))):
        cells = " | ".join(f"{by_digit[d]:.3f}" if d in by_digit else "-" for d in digits)
        lines.append(f"| `{name}` | **{np.mean(list(by_digit.values())):.3f}** | {cells} |")
    text = "\n".join(lines)
    print(text)
    (out / "accuracy_digits.md").write_text(text + "\n")
    (out / "accuracy_digits.json").write_text(json.dumps(table, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    from contract.frames import frame_size

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="part", required=True)
    syn = sub.add_parser("synthetic", help="synth -> train VAE and GAN -> every head and baseline per family")
    syn.add_argument("--size", type=frame_size, default=frame_size(64), help="WxH or N (default 64)")
    syn.add_argument("--n-normal", type=int, default=8000)
    syn.add_argument("--max-per-family", type=int, default=None, help="test frames per family (default: all)")
    syn.add_argument(
        "--no-ablation", dest="ablation", action="store_false", help="skip the patch-head ablation rows"
    )
    syn.add_argument(
        "--skip-heads",
        nargs="*",
        default=[],
        help="heads not scored, e.g. vae-iwae at 256x144 (16 decodes a frame: ~0.5 s a frame on 2 cores)",
    )
    syn.add_argument("--synth-args", default="", help='extra flags for edgecase synth, e.g. "--n-test 200"')
    dig = sub.add_parser("digits", help="one-class handwritten digits, all ten digits")
    dig.add_argument("--digits", type=int, nargs="+", default=list(range(10)))
    for p in (syn, dig):
        p.add_argument(
            "--out", required=True, help="folder for data, runs and result tables (reused if present)"
        )
        p.add_argument("--kinds", nargs="+", default=["vae", "gan"], choices=["vae", "gan"])
        p.add_argument(
            "--minutes", type=float, default=None, help="training budget per run (default: trainer's)"
        )
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--train-args", default="", help='extra flags for edgecase train, e.g. "--epochs 5"')
    args = parser.parse_args(argv)
    args.train_args = shlex.split(args.train_args)
    args.synth_args = shlex.split(getattr(args, "synth_args", ""))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_synthetic(args) if args.part == "synthetic" else run_digits(args)


if __name__ == "__main__":
    sys.exit(main())
