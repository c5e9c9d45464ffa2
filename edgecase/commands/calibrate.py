"""`edgecase calibrate`: re-calibrate a published model on new normal frames, as a new version.

The graph is copied unchanged (its sha256 re-checked) and scored with onnxruntime on NORMALS; the new
threshold and calibration scores go into a new manifest in `REPO/<name>/<next version>/`. The old
version is left as it was (versions are immutable).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgecase.commands import add_command


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub,
        "calibrate",
        "Re-calibrate a published model version on held-out normal frames; publishes a new version.",
        "edgecase calibrate models/vae-elbo/1 --data data/fleet-normals --target-fpr 0.01",
    )
    parser.add_argument("version_dir", metavar="MODEL_VERSION_DIR", help="e.g. models/vae-elbo/1")
    parser.add_argument(
        "--data", required=True, metavar="NORMALS", help="normal frames: folder, .tar shard or .parquet"
    )
    parser.add_argument("--target-fpr", type=float, default=0.01, help="false-positive rate of the threshold")
    parser.add_argument("--max-frames", type=int, metavar="N", help="use at most N frames")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from edgecase.cli import CliError

    version_dir = Path(args.version_dir)
    if not (version_dir / "manifest.json").is_file():
        raise CliError(f"{version_dir} is not a published model version (no manifest.json)")
    if not Path(args.data).exists():
        raise CliError(f"--data {args.data} does not exist")
    if not 0.0 < args.target_fpr < 1.0:
        raise CliError(f"--target-fpr must be in (0, 1), got {args.target_fpr}")

    from contract.manifest import ManifestError
    from training.export import ExportError, recalibrate

    try:
        recalibrate(version_dir, args.data, target_fpr=args.target_fpr, max_frames=args.max_frames)
    except (ExportError, ManifestError, ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    return 0
