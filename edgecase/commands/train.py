"""`edgecase train vae|gan`: learn what normal frames look like, into a run directory.

``--data`` takes image folders, tar shards, Parquet files, or a folder written by ``edgecase synth``
(its normal ``train`` split trains, its ``val`` split drives early stopping); several ``--data``
concatenate, so frames reviewed as normal can join a later run. Flags left out keep the defaults of
``training.vae_train.VAEConfig`` / ``training.gan_train.GANConfig``; ``--set KEY=VALUE`` reaches any
other field of those configs (e.g. ``--set stabiliser=spectral+r1`` for the GAN).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from pathlib import Path
from typing import Any

from edgecase.commands import add_command

log = logging.getLogger(__name__)

# flag dest -> config field (only the flags the user gave are passed on)
_COMMON = (
    "epochs",
    "batch_size",
    "lr",
    "size",
    "latent_dim",
    "width",
    "seed",
    "device",
    "max_minutes",
    "patience",
    "seg_steps",
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub,
        "train",
        "Train a VAE or a DCGAN on normal frames (checkpoints, early stopping, plots, calibration).",
        "edgecase train vae --data data/synth --size 256x144 --out runs/vae    # then: edgecase evaluate ...",
    )
    parser.add_argument("model", choices=["vae", "gan"], help="which generative model")
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="DIR_OR_SHARDS",
        help="folder, .tar shard or .parquet of normal frames, or an `edgecase synth` folder (repeatable); "
        "a labelled folder's val split validates and calibrates, and without one a seeded share of its "
        "train split is held out for that; symbolic links to folders are followed",
    )
    parser.add_argument(
        "--out", required=True, metavar="RUN_DIR", help="run directory to create (or --resume)"
    )
    # defaults (None here) are those of VAEConfig / GANConfig, recorded in RUN_DIR/config.json
    parser.add_argument("--epochs", type=int, help="maximum epochs")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="Adam learning rate")
    parser.add_argument(
        "--size",
        type=_size,
        metavar="WxH",
        help="model input, e.g. 256x144 (default) or 64 (square); frames are resized to fit and padded "
        "black (the one resize rule); both sides 32..512 and divisible by 8",
    )
    parser.add_argument("--latent-dim", type=int)
    parser.add_argument("--width", type=int, help="base channels of the networks")
    parser.add_argument("--depth", type=int, help="VAE stride-2 stages (default: down to 4x4)")
    parser.add_argument("--beta", type=float, help="VAE KL weight (1 = the ELBO)")
    parser.add_argument("--seed", type=int, help="seed: same seed, same data, CPU -> same weights")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto (CUDA if available)")
    parser.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    parser.add_argument(
        "--max-minutes",
        type=float,
        help="training-loop time budget, stops cleanly (default VAE 5, GAN 7 at 256x144: with the heads "
        "about 30 minutes in all on 2 CPU cores; VAE 7, GAN 15 up to 64x64)",
    )
    parser.add_argument("--patience", type=int, help="early stopping: epochs without val improvement")
    parser.add_argument(
        "--seg-steps",
        type=int,
        help="steps for the <kind>-seg head's segmentation net, trained after the model (default 250 at "
        "256x144, about 3 minutes on 2 CPU cores; 2400 up to 64x64; 0: no seg head)",
    )
    parser.add_argument("--resume", action="store_true", help="continue RUN_DIR from its checkpoint.pt")
    parser.add_argument("--dry-run", action="store_true", help="one tiny batch through every step (seconds)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any other config field (repeatable)"
    )
    parser.set_defaults(handler=run)


def _size(value: str) -> str:
    """--size as the config stores it, "WxH"; argparse reports a ValueError as a usage error."""
    from contract.frames import frame_size

    try:
        return str(frame_size(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _coerce(value: str, annotation: Any, key: str) -> Any:
    """Parse a --set value by the config field's type (int, float, bool, str, optional)."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        if value.lower() == "none" and type(None) in args:
            return None
        annotation = next(a for a in args if a is not type(None))
    try:
        if annotation is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return annotation(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"--set {key}={value}: expected {getattr(annotation, '__name__', annotation)}"
        ) from exc


def build_config(config_cls: type, args: argparse.Namespace) -> Any:
    """The config dataclass from the flags given (others keep their defaults)."""
    from contract.frames import frame_size
    from training.budgets import size_budgets

    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)  # resolves postponed (string) annotations
    values: dict[str, Any] = {}
    for name in (*_COMMON, "depth", "beta"):
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in fields:
            raise ValueError(f"--{name.replace('_', '-')} does not apply to `train {args.model}`")
        values[name] = value
    if args.no_amp:
        values["amp"] = False
    values["dry_run"] = bool(args.dry_run)
    for item in args.set:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            valid = ", ".join(sorted(fields))
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of: {valid}")
        # a size is "WxH" or a side, parsed like --size
        values[key] = str(frame_size(raw.strip())) if key == "size" else _coerce(raw.strip(), hints[key], key)
    # budgets follow the frame size where the user set none (64x64 keeps its measured budgets)
    size = values.get("size", fields["size"].default)
    budgets = {k: v for k, v in size_budgets(args.model, size).items() if k in fields}
    return config_cls(**{**budgets, **values})


def run(args: argparse.Namespace) -> int:
    from edgecase.cli import CliError

    if args.model == "vae":
        from training.vae_train import VAEConfig, train_vae

        config_cls, train = VAEConfig, train_vae
    else:
        from training.gan_train import GANConfig, train_gan

        config_cls, train = GANConfig, train_gan
    if not args.data and not args.dry_run and not args.resume:
        raise CliError("give at least one --data DIR_OR_SHARDS (or --dry-run to use noise frames)")
    for source in args.data:
        if not Path(source).exists():
            raise CliError(f"--data {source}: no such file or folder")
    try:
        cfg = build_config(config_cls, args)
        run_dir = train(cfg, list(args.data), Path(args.out), resume=args.resume)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    print(f"run written to {run_dir}")
    return 0
