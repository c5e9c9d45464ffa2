"""`edgecase report`: Markdown + PNG report of an `edgecase score` output folder.

Score distribution against the model's calibration normals, drift (PSI, KS statistic), edge-case rate
per shard against the target FPR, and the top-k frames read back from their shards. The work is in
`service/batch_report.py` (no torch, no onnxruntime); matplotlib comes with the `report` extra.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgecase.commands import add_command


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub,
        "report",
        "Report on an `edgecase score` output folder: scores vs calibration, drift, shards, top frames.",
        "edgecase report scores/ --repo models/ --top-k 16   # writes scores/report/report.md + PNGs",
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the --out folder of `edgecase score`")
    parser.add_argument(
        "--repo",
        type=Path,
        default=Path("models"),
        help="model repository that made the scores (default: models)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        nargs="+",
        default=[],
        metavar="SOURCES",
        help="where the scored shards are now, if they moved (files or folders; matched by file name)",
    )
    parser.add_argument("--top-k", type=int, default=16, help="frames in the top-frames grid (default: 16)")
    parser.add_argument(
        "--out", type=Path, default=None, metavar="REPORT_DIR", help="report folder (default: OUT_DIR/report)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from edgecase.cli import CliError
    from service.batch_report import ReportError, write_report
    from service.report_figures import MissingPlotting

    try:
        report = write_report(
            args.out_dir, repo=args.repo, data=args.data, top_k=args.top_k, report_dir=args.out
        )
    except (ReportError, MissingPlotting) as exc:
        raise CliError(str(exc)) from exc
    n = report.numbers
    print(
        f"{n['scored']:,} scores of {n['run']['model']}/{n['run']['version']}: edge-case rate "
        f"{n['edge_case_rate']:.3%} (target {n['run']['target_fpr']:g}), PSI {n['psi']:.3f} "
        f"({n['psi_verdict']}), KS D {n['ks']:.3f}"
    )
    alerts = [s["name"] for s in n["shards"] if s["alert"]]
    if alerts:
        print(f"{len(alerts)} shard(s) flag far above the target FPR: {', '.join(alerts[:5])}")
    print(f"report: {report.markdown}")
    return 0
