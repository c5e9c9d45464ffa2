"""`edgecase score`: score data set shards offline with a published model, no server needed.

Reads folders, WebDataset tar shards or Parquet files, writes one row per frame (key, source, score,
p-value, is_edge_case) to CSV or Parquet, and can put every edge case into a flagged-frame store for
review. The work is in `service/batch_scoring.py`; this module only parses flags and prints.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgecase.commands import add_command

MAX_ERRORS_SHOWN = 5


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub,
        "score",
        "Score frames in folders, tar shards or Parquet files with a published model (no server).",
        "edgecase score --repo models/ --model vae-vae-elbo --data shards/ --out scores.csv "
        "--flag-store flagged/",
    )
    parser.add_argument(
        "--repo", type=Path, default=Path("models"), help="model repository (default: models)"
    )
    parser.add_argument("--model", required=True, help="model name in the repository")
    parser.add_argument("--version", type=int, default=None, help="model version (default: highest valid)")
    parser.add_argument(
        "--data",
        type=Path,
        nargs="+",
        required=True,
        help="frame sources: folders, .tar shards, .parquet files (several allowed)",
    )
    parser.add_argument("--out", type=Path, required=True, help="scores file: .csv or .parquet")
    parser.add_argument("--batch-size", type=int, default=64, help="frames per session.run (default: 64)")
    parser.add_argument(
        "--flag-store", type=Path, default=None, help="also keep every edge case in this flagged-frame store"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from edgecase.cli import CliError
    from service.batch_scoring import check_output_path, score_dataset
    from service.flagged import FlaggedStore
    from service.registry import ModelLoadError, ModelRegistry

    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        check_output_path(args.out)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    missing = [str(path) for path in args.data if not path.exists()]
    if missing:
        raise CliError(f"data not found: {', '.join(missing)}")
    try:
        model = ModelRegistry(args.repo).load(args.model, args.version)
    except ModelLoadError as exc:
        raise CliError(str(exc)) from exc
    height, width, _ = model.frame_shape
    print(
        f"model {model.name}/{model.version} on {model.providers[0]}: threshold {model.threshold:.6g} "
        f"(target FPR {model.manifest.threshold.target_fpr:g}), input {height}x{width}"
    )
    store = FlaggedStore(args.flag_store) if args.flag_store is not None else None
    try:
        summary = score_dataset(
            model,
            args.data,
            args.out,
            batch_size=args.batch_size,
            store=store,
            progress=not args.no_progress,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    finally:
        if store is not None:
            store.close()
    for source, key, reason in summary.errors[:MAX_ERRORS_SHOWN]:
        print(f"  skipped {source}" + (f" [{key}]" if key else "") + f": {reason}")
    if len(summary.errors) > MAX_ERRORS_SHOWN:
        print(f"  ... and {len(summary.errors) - MAX_ERRORS_SHOWN} more (see the warnings above)")
    print(summary.text())
    if store is not None:
        print(f"flagged frames: {args.flag_store} (edgecase flagged list --store {args.flag_store})")
    return 0
