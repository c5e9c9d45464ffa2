"""The model manifest: what an exported score graph is, how to feed it, and where its threshold is.

`models/<name>/<version>/manifest.json` sits beside `model.onnx`. The graph holds the math; the manifest
holds everything the graph cannot say about itself (score meaning, calibrated threshold, calibration
scores for p-values, provenance, file hashes). Every field is documented in `models/README.md`.
Imports no torch and no onnxruntime: export writes it, the service reads it.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from contract.frames import FrameSize

SCHEMA_VERSION: Final = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
# Enough order statistics for exact p-values on every realistic held-out set, small enough (~200 kB
# of JSON) to parse at load time. Larger sets are thinned to evenly spaced order statistics.
MAX_STORED_SCORES = 10_000
QUANTILE_LEVELS = (0.5, 0.9, 0.95, 0.99, 0.995, 0.999)


class ManifestError(ValueError):
    """A manifest that is missing, unreadable, or does not follow the schema; the message names the file."""


class _Strict(BaseModel):
    # Unknown keys are refused: a typo in a hand-edited manifest should fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInfo(_Strict):
    kind: str = Field(min_length=1, description="network family, e.g. 'vae' or 'gan'")
    head: str = Field(min_length=1, description="score head, e.g. 'vae-elbo'")
    definition: str = Field(min_length=1, description="what the score is, in one sentence")
    units: str = Field(min_length=1, description="units of the score, e.g. 'nats'")
    higher_is_more_anomalous: Literal[True] = True


class InputSpec(_Strict):
    name: Literal["frames"] = "frames"
    dtype: Literal["uint8"] = "uint8"
    layout: Literal["NHWC"] = "NHWC"
    channels: Literal[3] = 3
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    color: Literal["RGB"] = "RGB"
    # fit-pad-bilinear: resize to fit, pad with black (contract.frames.RESIZE_RULE); the legacy
    # centre crop stays readable so models exported before 0.3 serve as they were trained.
    resize_rule: Literal["fit-pad-bilinear", "center-crop-bilinear"] = "fit-pad-bilinear"
    value_range: tuple[int, int] = (0, 255)

    @property
    def size(self) -> FrameSize:
        """(height, width) of the model input, written ``WxH``."""
        return FrameSize(self.height, self.width)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one frame, the graph input without its batch axis."""
        return (self.height, self.width, self.channels)


class OutputSpec(_Strict):
    name: str = Field(min_length=1)
    # "N" for the dynamic batch axis, integers for fixed axes: ["N"] or ["N", 64, 64].
    shape: list[int | str] = Field(min_length=1)
    dtype: Literal["float32"] = "float32"


class Threshold(_Strict):
    """Where the flag goes: a frame is an edge case when ``score > value`` (:func:`is_edge_case`)."""

    value: float
    target_fpr: float = Field(gt=0.0, lt=1.0)
    calibration_n: int = Field(gt=0)
    calibrated_with: Literal["onnxruntime"] = "onnxruntime"


class Calibration(_Strict):
    n: int = Field(gt=0, description="number of held-out normal frames scored")
    quantiles: dict[str, float] = Field(description="level (as a string, e.g. '0.99') -> score")
    scores: list[float] = Field(
        min_length=1,
        max_length=MAX_STORED_SCORES,
        description="sorted calibration scores: all n, or evenly spaced order statistics if n is large",
    )
    data: list[str] = Field(default_factory=list, description="where the held-out normals came from")

    @field_validator("scores")
    @classmethod
    def _sorted_finite(cls, scores: list[float]) -> list[float]:
        if not all(math.isfinite(s) for s in scores):
            raise ValueError("calibration scores must be finite")
        if any(b < a for a, b in zip(scores, scores[1:], strict=False)):
            raise ValueError("calibration scores must be sorted ascending")
        return scores

    @model_validator(mode="after")
    def _count(self) -> Calibration:
        if len(self.scores) > self.n:
            raise ValueError(f"{len(self.scores)} stored scores but n={self.n}")
        return self

    @property
    def exact(self) -> bool:
        """True when every calibration score is stored, so p-values follow the formula exactly."""
        return len(self.scores) == self.n


class Parity(_Strict):
    max_rel_diff: float = Field(ge=0.0, description="max |a-b| / max(|a|, |b|, eps) over scores")
    eps: float = Field(gt=0.0)
    n_frames: int = Field(gt=0)
    batch_sizes: list[int] = Field(default_factory=list)
    tolerance: float | None = Field(default=None, description="the gate applied; None if only recorded")
    map_max_rel_diff: float | None = Field(
        default=None, ge=0.0, description="max |a-b| over anomaly maps / max |torch map| (None: no map)"
    )


class ExportInfo(_Strict):
    opset: int = Field(gt=0)
    exporter: str
    torch_version: str
    onnx_version: str
    onnxruntime_version: str
    variant: Literal["fp32", "fp16", "int8"] = "fp32"
    parity: Parity
    derived_from: str | None = Field(default=None, description="'<name>/<version>' this one was made from")


class TrainingInfo(_Strict):
    run_dir: str
    data_fingerprint: str | None = None
    data_sources: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)


class FileEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: int = Field(gt=0)
    created_at: datetime
    model: ModelInfo
    input: InputSpec
    outputs: list[OutputSpec] = Field(min_length=1)
    threshold: Threshold
    calibration: Calibration
    evaluation: dict[str, Any] | None = None
    training: TrainingInfo
    export: ExportInfo
    files: dict[str, FileEntry]

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        names = [o.name for o in self.outputs]
        if "score" not in names:
            raise ValueError("outputs must include 'score'")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate output names: {names}")
        if MODEL_FILE not in self.files:
            raise ValueError(f"files must list {MODEL_FILE!r}")
        if self.threshold.calibration_n != self.calibration.n:
            raise ValueError(
                f"threshold.calibration_n={self.threshold.calibration_n} "
                f"!= calibration.n={self.calibration.n}"
            )
        return self

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def p_values(self, scores: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Conformal p-values of ``scores`` against the stored calibration scores."""
        return conformal_p_values(scores, self.calibration.scores, self.calibration.n)

    def verdicts(self, scores: npt.ArrayLike) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        """(p-values, edge-case flags) of scores: the one step from a score to a verdict, so the service,
        batch scoring and evaluation all flag by :func:`is_edge_case` at this manifest's threshold."""
        return self.p_values(scores), is_edge_case(scores, self.threshold.value)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    def write(self, path: Path) -> None:
        """Write as JSON (callers write into a temporary folder that is published by rename)."""
        Path(path).write_text(self.to_json(), encoding="utf-8")


def is_edge_case(scores: npt.ArrayLike, threshold: float) -> npt.NDArray[np.bool_]:
    """The one flag rule: strictly above the threshold.

    The threshold is the calibration scores' (1 - target FPR) quantile (training/calibrate.py), so
    "strictly above" keeps the false-positive rate on the calibration set at or below the target;
    service, batch scoring and evaluation all call this.
    """
    return np.asarray(scores) > threshold


def conformal_p_values(
    scores: npt.ArrayLike, calibration_scores: npt.ArrayLike, n: int | None = None
) -> npt.NDArray[np.float64]:
    """Conformal p-values ``(1 + #{c_i >= s}) / (n + 1)`` of each score (Vovk et al. 2005; Bates et al.
    2023, "Testing for outliers with conformal p-values"), the one definition.

    A frame exchangeable with the calibration normals gets a valid p-value, so "p = 0.003" reads as
    "more unusual than 99.7% of normal frames". ``n`` is the number of normals scored when fewer were
    stored (:func:`thin_scores`): the count is then scaled by n / stored, which is exact at the stored
    order statistics. Scores and calibration scores must be finite.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size and not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite to have a p-value")
    cal = np.sort(np.asarray(calibration_scores, dtype=np.float64).ravel())
    if cal.size == 0:
        raise ValueError("p-values need at least one calibration score")
    if not np.all(np.isfinite(cal)):
        raise ValueError(
            f"calibration scores must be finite, got {int((~np.isfinite(cal)).sum())} non-finite"
        )
    total = cal.size if n is None else n
    if total < cal.size:
        raise ValueError(f"{cal.size} stored calibration scores but n={total}")
    # side="left": the index of the first c >= s, so everything from there on counts.
    n_ge = cal.size - np.searchsorted(cal, s, side="left")
    count = n_ge if total == cal.size else n_ge * (total / cal.size)
    return np.asarray((1.0 + count) / (total + 1.0), dtype=np.float64)


def thin_scores(scores: npt.ArrayLike, max_stored: int = MAX_STORED_SCORES) -> list[float]:
    """Sorted scores, thinned to at most `max_stored` evenly spaced order statistics (min and max kept)."""
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise ValueError("no calibration scores")
    if s.size > max_stored:
        s = s[np.unique(np.linspace(0, s.size - 1, max_stored).round().astype(np.int64))]
    return [float(x) for x in s]


def quantiles_of(scores: npt.ArrayLike, levels: tuple[float, ...] = QUANTILE_LEVELS) -> dict[str, float]:
    """Named quantiles for humans and dashboards ('0.99' -> score); p-values use the stored scores.

    Inverted-CDF quantiles (numpy ``method="inverted_cdf"``), as models/README.md promises: each is
    a calibration score itself, the smallest ``t`` with ``#{c_i <= t} >= q * n``, the rule the
    threshold follows too (training/calibrate.py).
    """
    s = np.asarray(scores, dtype=np.float64)
    return {f"{q:g}": float(np.quantile(s, q, method="inverted_cdf")) for q in levels}


def file_entry(path: Path) -> FileEntry:
    """sha256 and size of a file, streamed so large graphs do not need to fit in memory twice."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(sha256=digest.hexdigest(), bytes=size)


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def load_manifest(path: Path | str) -> Manifest:
    """Read and validate a manifest; raises ManifestError naming the file and every problem found."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: manifest not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    found = raw.get("schema_version")
    if found != SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: schema_version {found!r} is not supported (this code reads {SCHEMA_VERSION})"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ManifestError(f"{path}: invalid manifest: {problems}") from exc
