"""`edgecase score`: score data set shards offline with a published model, no server needed.

Reads folders, WebDataset tar shards or Parquet files (paths or fsspec URLs such as s3://), writes
one Parquet file per shard to OUT_DIR plus OUT_DIR/_summary.json, resumes a killed run, and can
put every edge case into a flagged-frame store (once, however often the run is repeated). The
work is in service/batch_scoring.py (local engine) and service/batch_ray.py (Ray Data); this
module only parses flags and prints.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from edgecase.commands import add_command

if TYPE_CHECKING:
    from contract.shards import Shard
    from contract.storage import RemotePath
    from service.batch_summary import BatchOptions, RunSummary
    from service.flag_store import FlagStore
    from service.registry import LoadedModel

MAX_ERRORS_SHOWN = 5

EXIT_CODES = """
Frames of any size: each is decoded and resized to the model's input (the manifest's input.width x
input.height) by the manifest's input.resize_rule, exactly as POST /score does.

Output: OUT_DIR/<shard>.parquet per input shard (tar or Parquet file, or --chunk-size loose images),
columns key, source, score, p_value, is_edge_case, error; OUT_DIR/_summary.json for the run.

Exit status:
  0  every shard scored (or already done with --resume) and frame errors within --max-frame-errors
  1  a shard could not be read to the end (no output file for it), or the fraction of frames that
     failed to decode is above --max-frame-errors; every failure is listed in _summary.json;
     or --pushgateway could not take the run's totals (the output is complete: rerun with --resume
     to push again without scoring again)
  2  usage error: bad flag, source not found, model not loadable, output not writable
  130 interrupted (Ctrl-C); finished shards are kept, rerun with --resume

Distributed:
  edgecase score --engine ray --address ray://head:10001 --repo s3://bucket/models --model vae-elbo \\
      --data s3://bucket/shards/ --out s3://bucket/scores/ --concurrency 8"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub,
        "score",
        "Score frames in folders, tar shards or Parquet files with a published model (no server).",
        "edgecase score --repo models/ --model vae-elbo --data shards/ --out scores/ --flag-store flagged/",
    )
    parser.epilog = (parser.epilog or "") + "\n" + EXIT_CODES
    parser.add_argument("--repo", default="models", help="model repository: path or URL (default: models)")
    parser.add_argument("--model", required=True, help="model name in the repository (e.g. vae-elbo)")
    parser.add_argument("--version", type=int, default=None, help="model version (default: highest valid)")
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="SOURCE",
        help="frame sources: folders, .tar shards, .parquet files; paths or URLs (s3://bucket/shards/)",
    )
    parser.add_argument("--out", required=True, help="output folder (path or URL): one .parquet per shard")
    parser.add_argument(
        "--resume", action="store_true", help="keep shards already scored by this model version in OUT"
    )
    parser.add_argument(
        "--flag-store",
        default=None,
        help="also keep every edge case in this flagged-frame store, once however often the run is "
        "repeated: a folder (SQLite + files, made if missing) or a postgresql:// URL (the shared store)",
    )
    parser.add_argument(
        "--flag-images",
        default=None,
        help="with a postgresql:// --flag-store: where its images are, s3://bucket/prefix/ or a folder "
        "(default: $EDGECASE_FLAGGED_IMAGES)",
    )
    parser.add_argument(
        "--max-frame-errors",
        type=float,
        default=0.001,
        help="fraction of frames allowed to fail decoding before the exit status is 1 (default: 0.001)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="frames per session.run (default: 64)")
    parser.add_argument(
        "--workers", type=int, default=None, help="decode workers (default: CPU count, at most 8)"
    )
    parser.add_argument(
        "--decode-pool",
        choices=("thread", "process"),
        default="thread",
        help="decode in threads (default; Pillow releases the GIL) or processes",
    )
    parser.add_argument(
        "--chunk-size", type=int, default=1000, help="loose images per output file (default: 1000)"
    )
    parser.add_argument("--engine", choices=("local", "ray"), default="local", help="local (default) or ray")
    parser.add_argument("--address", default=None, help="Ray cluster address (ray://host:10001, auto)")
    parser.add_argument("--concurrency", type=int, default=None, help="Ray scoring actors (default: 1)")
    parser.add_argument("--pushgateway", default=None, help="push the run's totals to this Pushgateway URL")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from contract.shards import list_shards
    from contract.storage import as_location
    from edgecase.cli import CliError
    from edgecase.commands.flagged import open_store
    from service.batch_scoring import load_model
    from service.batch_summary import BatchOptions
    from service.registry import ModelLoadError

    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    options = BatchOptions(
        batch_size=args.batch_size,
        workers=workers,
        pool=args.decode_pool,
        chunk_size=args.chunk_size,
        resume=args.resume,
        max_frame_errors=args.max_frame_errors,
        progress=not args.no_progress,
    )
    try:
        options.check()
        if args.concurrency is not None and args.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
        if args.out.lower().rstrip("/").endswith((".csv", ".parquet")):
            raise ValueError(f"--out {args.out}: a folder now (one .parquet file per shard), not a file")
        if args.engine != "ray" and (args.address or args.concurrency):
            raise ValueError("--address and --concurrency apply to --engine ray only")
        shards = list_shards(args.data, chunk_size=args.chunk_size)
        out_dir = as_location(args.out)
        model = load_model(args.repo, args.model, args.version)
    except (ValueError, FileNotFoundError, ModelLoadError, ImportError) as exc:
        raise CliError(str(exc).replace("frame source not found", "data not found")) from exc
    print(
        f"model {model.name}/{model.version} on {model.providers[0]}: threshold {model.threshold:.6g} "
        f"(target FPR {model.manifest.threshold.target_fpr:g}), input {model.input_size} (W x H) "
        f"by {model.resize_rule}; "
        f"{len(shards):,} shard(s) -> {args.out}"
    )
    store = (
        open_store(args.flag_store, args.flag_images, create=True) if args.flag_store is not None else None
    )
    try:
        if args.engine == "ray":
            from service.batch_ray import score_shards_ray

            summary = score_shards_ray(
                args.repo, model, shards, out_dir, options=options, store=store,
                address=args.address, concurrency=args.concurrency or 1,
            )  # fmt: skip
        else:
            summary = _score_local(model, shards, out_dir, options, store)
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from exc
    finally:
        if store is not None:
            store.close()
    for failure in summary.failures[:MAX_ERRORS_SHOWN]:
        key = f" [{failure['key']}]" if failure["key"] else ""
        print(f"  failed {failure['source']}{key}: {failure['error']}")
    if len(summary.failures) > MAX_ERRORS_SHOWN:
        print(f"  ... and {len(summary.failures) - MAX_ERRORS_SHOWN} more (all in {args.out}/_summary.json)")
    print(summary.text() + f" -> {args.out}")
    if store is not None:
        print(f"flagged frames: {args.flag_store} (edgecase flagged list --store {args.flag_store})")
    if summary.too_many_frame_errors:
        print(
            f"edgecase score: {summary.errors:,} of {summary.frames:,} frames failed, above "
            f"--max-frame-errors {args.max_frame_errors:g}",
            file=sys.stderr,
        )
    if args.pushgateway and not _push(args.pushgateway, summary):
        return 1
    return summary.exit_status


def _push(url: str, summary: RunSummary) -> bool:
    """The run's totals to a Pushgateway; a push that fails is reported (the run's files stand)."""
    from service.batch_push import PushError, push_run

    try:
        push_run(url, summary.as_dict(), succeeded=summary.exit_status == 0)
    except PushError as exc:
        print(
            f"edgecase score: could not push to {url}: {exc} (the output in --out is complete)",
            file=sys.stderr,
        )
        return False
    print(f"pushed the run's totals to {url} (job edgecase_score)")
    return True


def _score_local(
    model: LoadedModel,
    shards: list[Shard],
    out_dir: Path | RemotePath,
    options: BatchOptions,
    store: FlagStore | None,
) -> RunSummary:
    """The local engine, with a progress bar unless --no-progress."""
    from service.batch_scoring import score_shards

    if not options.progress:
        return score_shards(model, shards, out_dir, options=options, store=store)
    from tqdm import tqdm

    with tqdm(unit="frame", desc=f"score {model.name}/{model.version}") as bar:
        return score_shards(model, shards, out_dir, options=options, store=store, on_progress=bar.update)
