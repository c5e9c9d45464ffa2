"""`edgecase ensemble`: one score head over a VAE run and a GAN run trained on the same frames.

Writes an ensemble run (training/ensemble.py): fits the ``ensemble-combo`` head's statistics and
rule on the members' shared validation normals and calibrates its threshold there, so that
``evaluate``, ``export`` and the service use it like any run's head.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgecase.commands import add_command


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub,
        "ensemble",
        "Combine a VAE run and a GAN run of the same data into one head (ensemble-combo), calibrated.",
        "edgecase ensemble runs/vae runs/gan --out runs/ensemble",
    )
    parser.add_argument(
        "members", nargs=2, metavar="RUN_DIR", help="a VAE run and a GAN run (`edgecase train`)"
    )
    parser.add_argument("--out", required=True, metavar="ENSEMBLE_DIR", help="the ensemble run to write")
    parser.add_argument("--target-fpr", type=float, default=0.01, help="false-positive rate of the threshold")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from edgecase.cli import CliError

    if not 0.0 < args.target_fpr < 1.0:
        raise CliError(f"--target-fpr must be in (0, 1), got {args.target_fpr}")
    from training.ensemble import HEAD, create_ensemble
    from training.heads import calibrate_heads
    from training.runs import run_normals

    try:
        out = create_ensemble(args.members, args.out)
        calibration = calibrate_heads(out, run_normals(out, "val"), heads=[HEAD], target_fpr=args.target_fpr)[
            HEAD
        ]
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    record = json.loads((Path(out) / "banks" / f"{HEAD}.json").read_text())
    print(f"{HEAD}: {len(record['components'])} components ({', '.join(record['components'])})")
    scores = record["pseudo_auroc_by_rule"]  # protocol scores: (AUROC + detection at 1%) / 2
    print(f"rule {record['rule']} (protocol score by rule: {scores})")
    print(f"threshold {calibration.threshold:.4g} at FPR {args.target_fpr:g}, n={calibration.n} val normals")
    print(f"ensemble run written to {out}; next: edgecase evaluate {out} --data LABELLED")
    return 0
