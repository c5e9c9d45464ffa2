"""`edgecase export`: publish one score head of a run as an ONNX graph plus manifest in the model repo.

Every export is checked (onnx.checker, torch vs onnxruntime parity at batch 1 and 37 on normal and
edge-case frames) and calibrated with onnxruntime on held-out normals before it is published as
`REPO/<name>/<next version>/` by an atomic rename. See models/README.md for the manifest fields.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgecase.commands import add_command

VARIANTS = ("fp32", "fp16", "int8")  # kept in step with training.variants.VARIANTS (no torch import here)


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub,
        "export",
        "Export a run's score head to ONNX, check parity, calibrate with onnxruntime, publish a new version.",
        "edgecase export runs/ensemble --repo models/    # or: runs/vae --head vae-elbo",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run made by `edgecase train` or `ensemble`")
    parser.add_argument(
        "--head",
        help="score head, e.g. vae-elbo, gan-feat (default: the run's best head by the accuracy "
        "benchmark: ensemble-combo, vae-seg, gan-combo)",
    )
    parser.add_argument(
        "--repo", type=Path, default=Path("models"), help="model repository (default: models/)"
    )
    parser.add_argument(
        "--name", help="model name in the repo (default: the head, plus -fp16/-int8 for variants)"
    )
    parser.add_argument(
        "--variant", choices=VARIANTS, default="fp32", help="fp32; fp16 for CUDA; int8 for CPU"
    )
    parser.add_argument(
        "--data",
        metavar="NORMALS",
        help="held-out normal frames to calibrate on (default: the run's own validation split)",
    )
    parser.add_argument("--target-fpr", type=float, default=0.01, help="false-positive rate of the threshold")
    parser.add_argument("--version", type=int, help="publish as this version (refused if it exists)")
    parser.add_argument("--max-calibration", type=int, metavar="N", help="calibrate on at most N normals")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from edgecase.cli import CliError

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").is_file():
        raise CliError(f"{run_dir} is not a run directory (no config.json); train one with `edgecase train`")
    if not 0.0 < args.target_fpr < 1.0:
        raise CliError(f"--target-fpr must be in (0, 1), got {args.target_fpr}")
    if args.version is not None and args.version < 1:
        raise CliError("--version must be a positive integer")
    if args.data and not Path(args.data).exists():
        raise CliError(f"--data {args.data} does not exist")

    from training.export import ExportError, export_run
    from training.heads import default_head_of

    try:
        head = args.head or default_head_of(run_dir)
        if args.head is None:
            print(f"--head not given: exporting {head}, this run's best head (docs/benchmarks.md)")
        export_run(
            run_dir,
            head,
            args.repo,
            name=args.name,
            variant=args.variant,
            data=args.data,
            target_fpr=args.target_fpr,
            version=args.version,
            max_calibration=args.max_calibration,
        )
    except (ExportError, ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    return 0
