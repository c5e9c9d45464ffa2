"""Tiny labelled data sets for the training tests (contract writers, no torch), and the parity check.

``write_tiny_synth`` lays a folder out as ``edgecase synth`` does (keys ``<split>/<family>/<family>_n``,
labels.csv, synth.json), with crude procedural road frames: sky over road with a lane marking, and a
``fog`` family that blends them towards grey. Small and fast; not the real generator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from contract.labels import LabelRow, write_labels
from contract.writers import open_writer


def road_frame(rng: np.random.Generator, size: int = 32, family: str = "normal") -> npt.NDArray[np.uint8]:
    """A crude dashcam-like frame: sky gradient, grey road, a white lane line, sensor noise."""
    y = np.linspace(0.0, 1.0, size)[:, None, None]
    x = np.linspace(0.0, 1.0, size)[None, :, None]
    sky = rng.uniform(120, 230, 3) * (1 - 0.3 * y)
    road = np.array([90.0, 90.0, 95.0]) + rng.normal(0, 8, 3)
    img = np.where(y < 0.45, sky, road) * np.ones((size, size, 3))
    lane = (y > 0.45) & (np.abs(x - 0.5 - rng.uniform(-0.05, 0.05)) < 0.02 + 0.03 * y)
    img = np.where(lane, 240.0, img)
    img = img + rng.normal(0, 3, img.shape)
    if family == "fog":
        a = rng.uniform(0.5, 0.8)
        img = img * (1 - a) + 200 * a
    elif family == "noise":
        img = img + rng.normal(0, 40, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_tiny_synth(
    out: Path,
    *,
    size: int = 32,
    n_train: int = 16,
    n_val: int = 6,
    n_test: int = 4,
    fmt: str = "dir",
    seed: int = 0,
) -> Path:
    """A synth-style folder: train/val normals, test normals + fog, labels.csv and synth.json."""
    rng = np.random.default_rng(seed)
    rows: list[LabelRow] = []
    plan = {
        "train": [("normal", n_train)],
        "val": [("normal", n_val)],
        "test": [("normal", n_test), ("fog", n_test)],
    }
    for split, families in plan.items():
        with open_writer(out, fmt, split) as writer:  # type: ignore[arg-type]
            for family, count in families:
                for i in range(count):
                    key = f"{split}/{family}/{family}_{i:06d}"
                    strength = 0.0 if family == "normal" else 0.7
                    meta = {"family": family, "split": split, "strength": strength}
                    path = writer.write(key, road_frame(rng, size, family), meta)
                    rows.append(LabelRow(key=key, path=path, split=split, family=family, strength=strength))
    write_labels(out, rows)
    (out / "synth.json").write_text(json.dumps({"size": size, "seed": seed, "note": "tiny test set"}))
    return out


def write_plain_folder(out: Path, n: int, *, size: int = 32, seed: int = 0) -> Path:
    """An unlabelled image folder of ``n`` normal frames (what a user's own data looks like)."""
    rng = np.random.default_rng(seed)
    with open_writer(out, "dir", "frames") as writer:
        for i in range(n):
            writer.write(f"cam/{i:04d}", road_frame(rng, size), {})
    return out


def assert_parity(
    graph: Any, frames: npt.NDArray[np.uint8], path: Path, batches: tuple[int, ...] = (5,)
) -> list[str]:
    """Export ``graph`` once (the exporter ``edgecase export`` uses), run it in onnxruntime at each
    batch size, and hold it to the export's own parity rule (training/onnx_graph.py): scores within
    ``PARITY_TOLERANCE`` relative difference (eps: the median |score|), maps within the tolerance of
    their largest value. Returns the graph's output names.
    """
    import warnings

    import torch

    from training.onnx_graph import (
        MIN_PARITY_EPS,
        PARITY_TOLERANCE,
        export_onnx,
        ort_session,
        parity_eps,
        rel_diff,
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's own deprecation warnings
        names, _ = export_onnx(graph, path, size=(frames.shape[1], frames.shape[2]))
    session = ort_session(path)
    for batch in batches:
        chunk = np.ascontiguousarray(frames[:batch])
        with torch.no_grad():
            out = graph(torch.from_numpy(chunk))
        want = [t.float().numpy() for t in (out if isinstance(out, tuple) else (out,))]
        got = session.run(names, {"frames": chunk})
        assert len(got) == len(want) == len(names)
        for name, g, w in zip(names, got, want, strict=True):
            assert g.shape == w.shape, (name, batch)
            if name == "score":
                worst = float(rel_diff(w, g, parity_eps(w)).max())
            else:
                worst = float(np.abs(g - w).max()) / max(float(np.abs(w).max()), MIN_PARITY_EPS)
            assert worst <= PARITY_TOLERANCE, f"{name} at batch {batch}: {worst:.3g} > {PARITY_TOLERANCE:g}"
    return list(names)
