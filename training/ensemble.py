"""Ensemble runs: a run directory over a VAE run and a GAN run trained on the same frames.

Its one head, ``ensemble-combo``, is training/heads/ensemble.py.

An ensemble is a run directory of its own, so ``evaluate``, ``export`` and ``serve`` treat it like
any run::

    RUN_DIR/config.json   {"kind": "ensemble", "members": [vae run, gan run], "size", "data", "seed", ...}
    RUN_DIR/banks/        the combo's statistics (ensemble-combo.json)
    RUN_DIR/calibration/  the head's calibration, as for every run

The members stay where they are (their paths are recorded, resolved to absolute paths) and must
share the data and the seed: the combo's statistics and threshold then come from validation
frames that neither member trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.runs import load_config, save_config
from training.shapes import size_text

KIND = "ensemble"
HEAD = "ensemble-combo"
MEMBER_KINDS = ("vae", "gan")
# What the ensemble copies from its members' configs (they must agree on the first four).
SHARED_FIELDS = ("size", "seed", "data_fingerprint", "val_fraction")
COPIED_FIELDS = ("data", "n_train", "n_val")


def _shared(config: dict[str, Any], field: str) -> Any:
    """A field to compare across members; sizes as "WxH" (old runs wrote an int side)."""
    value = config.get(field)
    return size_text(value) if field == "size" and value is not None else value


def create_ensemble(members: list[str | Path], out: str | Path) -> Path:
    """Write the ensemble run ``out`` over ``members`` (one VAE run, one GAN run); its config.json."""
    if len(members) != len(MEMBER_KINDS):
        raise ValueError(
            f"an ensemble needs {len(MEMBER_KINDS)} runs, one VAE and one GAN; got {len(members)}"
        )
    configs: dict[str, tuple[Path, dict[str, Any]]] = {}
    for member in members:
        path = Path(member).resolve()
        config = load_config(path)  # ValueError if it is not a run
        kind = config.get("kind")
        if kind not in MEMBER_KINDS:
            raise ValueError(
                f"{member}: a {kind!r} run cannot join an ensemble; members: {', '.join(MEMBER_KINDS)}"
            )
        if kind in configs:
            raise ValueError(f"{member}: two {kind} runs; an ensemble takes one VAE run and one GAN run")
        if not (path / "model.pt").is_file():
            raise ValueError(f"{member}: no model.pt (is its training finished?)")
        configs[kind] = (path, config)
    first = configs[MEMBER_KINDS[0]][1]
    for field in SHARED_FIELDS:
        values = {kind: _shared(cfg, field) for kind, (_, cfg) in configs.items()}
        if len(set(map(str, values.values()))) > 1:
            detail = ", ".join(f"{kind} {value}" for kind, value in values.items())
            raise ValueError(
                f"the runs differ in {field} ({detail}): an ensemble needs runs trained on the same frames "
                "with the same seed, so that its validation split is one neither member trained on"
            )
    out = Path(out)
    if (out / "config.json").is_file() and load_config(out).get("kind") != KIND:
        raise ValueError(f"{out} is already a {load_config(out).get('kind')} run; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "kind": KIND,
        "members": [str(configs[kind][0]) for kind in MEMBER_KINDS],
        **{field: first.get(field) for field in SHARED_FIELDS + COPIED_FIELDS if field in first},
        "dry_run": any(bool(cfg.get("dry_run")) for _, cfg in configs.values()),
    }
    save_config(out, config)
    return out


def member_runs(run_dir: str | Path) -> list[Path]:
    """The member run directories of an ensemble, each checked to still be a run."""
    config = load_config(run_dir)
    if config.get("kind") != KIND:
        raise ValueError(f"{run_dir} is a {config.get('kind')!r} run, not an ensemble")
    members = [Path(m) for m in config.get("members", [])]
    for member in members:
        if not (member / "config.json").is_file():
            raise FileNotFoundError(f"{run_dir}: member run {member} is gone (no config.json there)")
    return members
