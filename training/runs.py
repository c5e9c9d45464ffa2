"""Run directories: the on-disk record of one training run (layout in docs/architecture.md "Runs").

    RUN_DIR/config.json      resolved config: kind, size, hyper-parameters, seed, data, fingerprint, versions
    RUN_DIR/checkpoint.pt    last epoch (model, optimiser, epoch, rng states, history) for --resume
    RUN_DIR/model.pt         best weights: {"kind", "config", "state_dict", ...}; rebuilds the network alone
    RUN_DIR/history.jsonl    one JSON line per epoch
    RUN_DIR/plots/*.png

The run's own normal frames (its train / val split, re-read from the sources in config.json) come
from :func:`run_normals`: every head built after training (banks, seg nets, combos) uses them.

Like nanoGPT, the config travels inside model.pt, so an artefact always knows how it was made.
Checkpoint and model files are written to a temporary name and renamed, so a crash mid-write never
leaves a truncated file under the final name.
"""

from __future__ import annotations

import json
import os
import platform
import random
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from contract.frames import FrameSize
from training.shapes import parse_size

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
HISTORY = "history.jsonl"
PLOTS = "plots"


def create_run_dir(out_dir: str | Path, *, resume: bool = False) -> Path:
    """Make ``out_dir`` (and ``plots/``); refuse to overwrite a finished or started run unless resuming."""
    run_dir = Path(out_dir)
    if resume:
        if not (run_dir / CHECKPOINT).is_file():
            raise ValueError(f"cannot resume: no {CHECKPOINT} in {run_dir}")
    elif (run_dir / CONFIG).exists() or (run_dir / CHECKPOINT).exists():
        raise ValueError(f"{run_dir} already holds a run: use --resume to continue it, or another --out")
    (run_dir / PLOTS).mkdir(parents=True, exist_ok=True)
    return run_dir


def _atomic_write_bytes(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def save_config(run_dir: str | Path, cfg: dict[str, Any]) -> Path:
    """Write the resolved config as pretty JSON (paths as strings)."""
    path = Path(run_dir) / CONFIG
    text = json.dumps(_jsonable(cfg), indent=2, sort_keys=True) + "\n"
    _atomic_write_bytes(path, lambda tmp: tmp.write_text(text))
    return path


def load_config(run_dir: str | Path) -> dict[str, Any]:
    """Read ``config.json``; ValueError if ``run_dir`` is not a run."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory (no {CONFIG})")
    return json.loads(path.read_text())


def run_size(config: dict[str, Any]) -> FrameSize:
    """The model input size of a run's config: ``"WxH"`` (an int in runs made before H x W sizes)."""
    if "size" not in config:
        raise ValueError("the run's config has no size")
    return parse_size(config["size"])


def append_history(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Append one epoch's record to ``history.jsonl``."""
    with open(Path(run_dir) / HISTORY, "a") as fh:
        fh.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``history.jsonl`` (empty list before the first epoch)."""
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_history(run_dir: str | Path, records: list[dict[str, Any]]) -> None:
    """Rewrite ``history.jsonl`` (on resume: drop epochs logged after the checkpoint)."""
    text = "".join(json.dumps(_jsonable(r), sort_keys=True) + "\n" for r in records)
    _atomic_write_bytes(Path(run_dir) / HISTORY, lambda tmp: tmp.write_text(text))


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``checkpoint.pt`` (the last epoch, for --resume)."""
    path = Path(run_dir) / CHECKPOINT
    _atomic_write_bytes(path, lambda tmp: torch.save(state, tmp))
    return path


def load_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read ``checkpoint.pt``. It holds rng states (not only tensors), and it is our own file, so the
    full unpickler is used (``weights_only=False``)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"no {CHECKPOINT} in {run_dir}")
    return torch.load(path, map_location=map_location, weights_only=False)


def save_model(
    run_dir: str | Path, kind: str, config: dict[str, Any], state_dict: dict[str, Any], **extra: Any
) -> Path:
    """Atomically write ``model.pt`` = {"kind", "config", "state_dict", **extra} (tensors moved to CPU)."""
    path = Path(run_dir) / MODEL
    cpu_state = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    payload = {"kind": kind, "config": _jsonable(config), "state_dict": cpu_state, **extra}
    _atomic_write_bytes(path, lambda tmp: torch.save(payload, tmp))
    return path


def load_model_file(run_dir: str | Path) -> dict[str, Any]:
    """Read ``model.pt`` (weights-only safe: tensors, dicts, lists, numbers, strings)."""
    path = Path(run_dir) / MODEL
    if not path.is_file():
        raise ValueError(f"no {MODEL} in {run_dir}: train first (edgecase train ...)")
    return torch.load(path, map_location="cpu", weights_only=True)


def package_versions() -> dict[str, str]:
    """Versions that decide whether a run reproduces: python, platform, torch and the numeric stack."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("edgecase", "torch", "numpy", "pillow", "scikit-learn", "onnx"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["cuda"] = str(torch.version.cuda) if torch.version.cuda else "none"
    return versions


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; asking for CUDA without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but torch sees no CUDA device (use --device cpu)")
        return torch.device(name)
    raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda")


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; on request make torch pick deterministic kernels.

    On CPU that (plus a fixed thread count) gives bit-identical runs for a seed. On CUDA,
    deterministic cuBLAS also needs CUBLAS_WORKSPACE_CONFIG, set here if absent.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    """Python and torch generator states, stored in checkpoints so a resumed run continues identically."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def split_train_normals(
    run_dir: str | Path, n_first: int, n_second: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Two disjoint seeded subsets of a run's training normals (bank frames, held-out frames).

    When the run has fewer than ``n_first + n_second`` frames the held-out set gets at most a quarter
    of them and the bank the rest, so small runs still have both.
    """
    frames = run_normals(run_dir, "train")
    seed = int(load_config(run_dir).get("seed", 0))
    if n_first + n_second > len(frames):
        n_second = min(n_second, len(frames) // 4)
        n_first = len(frames) - n_second
    order = np.random.default_rng(seed).permutation(len(frames))
    first = np.sort(order[:n_first])
    second = np.sort(order[n_first : n_first + n_second])
    return frames[first], frames[second]


def run_normals(run_dir: str | Path, split: str, limit: int | None = None) -> npt.NDArray[np.uint8]:
    """Normal frames of a run's own data (``train`` or ``val`` split), at the run's image size.

    Reads the sources named in ``RUN_DIR/config.json`` with the run's seed, so the split is the one
    the run trained on. ``limit`` caps the frames (a seeded subset for ``train``).
    """
    from training.data import load_training_frames

    config = load_config(run_dir)
    sources = config.get("data")
    if not sources:
        raise ValueError(f"{run_dir}/config.json names no data sources")
    sources = [sources] if isinstance(sources, str) else list(sources)
    seed = int(config.get("seed", 0))
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    data = load_training_frames(sources, run_size(config), seed=seed)
    frames = data.train if split == "train" else data.val
    if limit is not None and len(frames) > limit:
        pick = np.sort(np.random.default_rng(seed).choice(len(frames), limit, replace=False))
        frames = frames[pick]
    return frames
