"""`edgecase synth`: write synthetic dashcam frames (normal + edge-case families) to disk."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgecase.commands import add_command

# Spelled out (not imported from training.synth) so building the parser imports no numpy;
# tests/test_synth_cli.py checks it matches training.synth.FAMILIES.
FAMILY_NAMES = (
    "night, fog, rain, snow, pedestrian, animal, sharp_curve, construction, glare, lens_dirt, sensor_fault"
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub,
        "synth",
        "Generate synthetic driving frames: train/val normals and a test split with every edge-case family.",
        "edgecase synth --out data/synth --size 256x144 --n-normal 8000 --families all --seed 0\n"
        "  edgecase synth --out data/blind --seed 7 --object-distance 25-80   # a second configuration\n"
        "  edgecase synth --out data/hd --size 1920x1080 --n-normal 50 --n-per-family 5   # benchmarks",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (must be empty or new)")
    parser.add_argument(
        "--size",
        default="256x144",
        help="frame size WxH (16:9 256x144, 4:3 192x144, 1920x1080; sides 32..4096) or N for a square "
        "N x N frame, 32..256 (default 256x144)",
    )
    parser.add_argument(
        "--object-distance",
        default="15-60",
        metavar="NEAR-FAR",
        help="metres to the pedestrian, animal or first cone in wide frames, near end at strength 1 "
        "(default 15-60); square frames size objects in pixels and ignore it",
    )
    parser.add_argument(
        "--n-normal", type=int, default=8000, help="normal frames in the train split (default 8000)"
    )
    parser.add_argument(
        "--n-val", type=int, default=1000, help="normal frames in the val split (default 1000)"
    )
    parser.add_argument(
        "--n-test-normal", type=int, default=1000, help="normal frames in the test split (default 1000)"
    )
    parser.add_argument(
        "--n-per-family", type=int, default=200, help="test frames of each edge-case family (default 200)"
    )
    parser.add_argument(
        "--families", default="all", help=f"'all' or a comma list of: {FAMILY_NAMES} (default all)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; same seed and flags, same frames (default 0)"
    )
    parser.add_argument(
        "--format",
        choices=("dir", "tar", "parquet"),
        default="dir",
        help="PNG folder, WebDataset tar or Parquet",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace earlier synth output in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def _validate(args: argparse.Namespace) -> None:
    from edgecase.cli import CliError
    from training.synth.pinhole import distance_range
    from training.synth.render import check_size

    try:
        args.size = check_size(args.size)
    except ValueError as exc:
        raise CliError(f"--{exc}") from None
    try:
        args.object_distance = distance_range(args.object_distance)
    except ValueError as exc:
        raise CliError(f"--{str(exc).replace('object distance', 'object-distance', 1)}") from None
    for flag in ("n_normal", "n_val", "n_test_normal", "n_per_family"):
        if getattr(args, flag) < 0:
            raise CliError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise CliError(f"--out {out} is not empty; pass --overwrite to replace earlier synth output")


def run(args: argparse.Namespace) -> int:
    from edgecase.cli import CliError
    from training.synth.dataset import resolve_families, write_dataset

    _validate(args)
    try:
        families = resolve_families(args.families)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    try:
        summary = write_dataset(
            args.out,
            size=args.size,
            n_normal=args.n_normal,
            families=families,
            seed=args.seed,
            fmt=args.format,
            n_val=args.n_val,
            n_test_normal=args.n_test_normal,
            n_per_family=args.n_per_family,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            object_distance=args.object_distance,
        )
    except (ValueError, FileExistsError) as exc:  # e.g. the folder filled up since the check
        raise CliError(str(exc)) from exc
    near, far = args.object_distance
    objects = f", objects {near:g}-{far:g} m" if summary["object_size_rule"] == "pinhole" else ""
    print(f"wrote {summary['frames']} frames ({args.size}{objects}, format {args.format}) to {args.out}")
    for split, counts in summary["splits"].items():
        detail = ", ".join(f"{family} {count}" for family, count in counts.items())
        print(f"  {split:<5} {sum(counts.values()):>6}  ({detail})")
    print(f"labels:        {summary['labels']}")
    print(f"contact sheet: {summary['contact_sheet']}")
    rate, seconds = summary["frames_per_s"], summary["seconds"]
    print(f"speed:         {rate:.0f} frames/s (render + encode + write, {seconds:.1f} s)")
    return 0
