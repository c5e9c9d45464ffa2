"""`edgecase evaluate`: score labelled frames with every head of a run and the pixel baselines.

The labelled data is a folder written by `edgecase synth` (its test split is used) or any folder of
frames with a ``labels.csv`` holding at least ``path`` (or ``key``) and ``family`` columns, where
``family`` is ``normal`` for normal frames and any other name for an edge case. The report (Markdown,
ROC curves, histograms, top frames, JSON) goes to ``--out`` (default ``RUN_DIR/eval``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from edgecase.commands import add_command

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub,
        "evaluate",
        "Evaluate a run's score heads and pixel baselines on labelled frames (AUROC per family).",
        "edgecase evaluate runs/vae --data data/synth --max-per-family 200 --out runs/vae/eval",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run made by `edgecase train`")
    parser.add_argument(
        "--data",
        required=True,
        metavar="LABELLED",
        help="a synth folder (its test split) or a folder with labels.csv (path or key, family; 'normal')",
    )
    parser.add_argument(
        "--heads", nargs="+", metavar="HEAD", help="heads to evaluate (default: all of the run's)"
    )
    parser.add_argument("--out", metavar="REPORT_DIR", help="where the report goes (default: RUN_DIR/eval)")
    parser.add_argument("--max-per-family", type=int, metavar="N", help="at most N frames of each family")
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the PCA/IsolationForest/kNN baselines"
    )
    parser.add_argument("--target-fpr", type=float, default=0.01, help="FPR of thresholds calibrated here")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from edgecase.cli import CliError

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").is_file():
        raise CliError(f"{run_dir} is not a run directory (no config.json); train one with `edgecase train`")
    if not (Path(args.data) / "labels.csv").is_file():
        raise CliError(f"{args.data} has no labels.csv (columns: path or key, family; 'normal' = normal)")
    if args.max_per_family is not None and args.max_per_family < 1:
        raise CliError("--max-per-family must be at least 1")
    from training.evaluate import evaluate_run
    from training.report import write_report

    try:
        results, families, frames, _ = evaluate_run(
            run_dir,
            args.data,
            heads=args.heads,
            max_per_family=args.max_per_family,
            baselines=not args.no_baselines,
            target_fpr=args.target_fpr,
            batch_size=args.batch_size,
        )
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    out = Path(args.out) if args.out else run_dir / "eval"
    meta = {"run_dir": str(run_dir), "data": str(args.data), "max_per_family": args.max_per_family}
    path = write_report(out, results, families, frames, meta)
    best = max(
        (r for r in results if r.source == "head"), key=lambda r: r.metrics["mean_auroc"], default=None
    )
    for r in sorted(results, key=lambda r: -r.metrics["mean_auroc"]):
        overall = r.metrics["overall"]["auroc"]
        print(f"{r.name:>16}  mean AUROC {r.metrics['mean_auroc']:.3f}  overall {overall:.3f}")
    if best is not None:
        print(f"best head: {best.name} (mean AUROC {best.metrics['mean_auroc']:.3f}); report: {path}")
    return 0
