"""The model repository, read by the service: find versions, verify them, and hold onnxruntime sessions.

Layout (Triton-style, see models/README.md): `<repo>/<name>/<integer version>/{model.onnx,manifest.json}`.
A version is loaded only after its manifest parses, the graph file matches the manifest's sha256 and
size, and the graph's input and outputs match the manifest's input spec and outputs. Anything else is a
`ModelLoadError` naming the file and the problem, raised at load time, never per request.

Which version serves is not decided here: the pool (`service/pool.py`) keeps the one serving table
and asks `load_newest()` for versions newer than the one it serves. A version that fails is refused
and remembered with a fingerprint of its files; it is tried again when those files change (a copy
that was still in progress) or when the caller asks (`POST /admin/reload`).

Thread safety: `InferenceSession.run` is safe to call from many threads on one session (onnxruntime
documents concurrent Run calls as supported), so one session per version serves every request.
No torch and no training imports here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from contract.frames import FrameSize
from contract.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, ManifestError, file_entry, load_manifest
from contract.repository import list_versions, version_of
from contract.sessions import open_session, resolve_providers

log = logging.getLogger(__name__)

# onnxruntime's type strings for what the manifest promises.
_ORT_TYPES = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}


class ModelLoadError(Exception):
    """A model version that cannot serve: the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class LoadedModel:
    """One verified version with its session; immutable, so it can be shared across requests."""

    name: str
    version: int
    path: Path
    manifest: Manifest
    session: ort.InferenceSession = field(repr=False)
    providers: list[str]

    @property
    def threshold(self) -> float:
        return self.manifest.threshold.value

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return self.manifest.input.frame_shape

    @property
    def input_size(self) -> FrameSize:
        """(height, width) of the model input; every frame is resized to it by `resize_rule`."""
        return self.manifest.input.size

    @property
    def resize_rule(self) -> str:
        """The manifest's resize rule (contract.frames.RESIZE_RULES): the one the model was trained with."""
        return self.manifest.input.resize_rule

    @property
    def output_names(self) -> list[str]:
        return self.manifest.output_names

    def score(self, frames: npt.NDArray[np.uint8]) -> dict[str, npt.NDArray[np.float32]]:
        """Score a uint8 NHWC batch in one session.run: {'score': [N], 'anomaly_map': [N, H, W]?}."""
        if not isinstance(frames, np.ndarray):
            raise TypeError(f"frames must be a numpy array, got {type(frames).__name__}")
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {frames.dtype}")
        if frames.ndim != 4 or frames.shape[1:] != self.frame_shape:
            raise ValueError(
                f"frames must be [N, {', '.join(map(str, self.frame_shape))}] (NHWC), "
                f"got {list(frames.shape)}"
            )
        names = self.output_names
        values = self.session.run(names, {self.manifest.input.name: np.ascontiguousarray(frames)})
        return dict(zip(names, values, strict=True))


def make_session(
    path: Path, providers: Sequence[str] | None = None, intra_op_threads: int = 0
) -> ort.InferenceSession:
    """The session the service runs (contract.sessions.open_session), CUDA first if present."""
    return open_session(path, resolve_providers(providers), intra_op_threads)


def load_version(
    path: Path,
    providers: Sequence[str] | None = None,
    intra_op_threads: int = 0,
) -> LoadedModel:
    """Verify one version folder and build its session; raises ModelLoadError on any mismatch."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    model_path = path / MODEL_FILE
    try:
        manifest = load_manifest(manifest_path)
    except ManifestError as exc:
        raise ModelLoadError(str(exc)) from exc
    named = version_of(path)
    if named is not None and (manifest.version != named or manifest.name != path.parent.name):
        raise ModelLoadError(
            f"{manifest_path}: manifest says {manifest.name}/{manifest.version} but the folder is "
            f"{path.parent.name}/{path.name}"
        )
    _verify_files(path, manifest)
    try:
        session = make_session(model_path, providers, intra_op_threads)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ModelLoadError(f"{model_path}: onnxruntime cannot load the graph: {exc}") from exc
    _verify_signature(model_path, session, manifest)
    return LoadedModel(
        name=manifest.name,
        version=manifest.version,
        path=path,
        manifest=manifest,
        session=session,
        providers=list(session.get_providers()),
    )


def _verify_files(path: Path, manifest: Manifest) -> None:
    for rel, expected in manifest.files.items():
        file = path / rel
        if not file.is_file():
            raise ModelLoadError(f"{file}: listed in the manifest but missing")
        found = file_entry(file)
        if found.bytes != expected.bytes:
            raise ModelLoadError(
                f"{file}: size {found.bytes} bytes, manifest says {expected.bytes} (truncated or replaced)"
            )
        if found.sha256 != expected.sha256:
            raise ModelLoadError(
                f"{file}: sha256 {found.sha256[:12]}... does not match the manifest's "
                f"{expected.sha256[:12]}... (corrupted or replaced)"
            )


def _static_dims(shape: Sequence[object]) -> list[int | None]:
    # onnxruntime reports symbolic/unknown dims as str or None; only ints are fixed.
    return [d if isinstance(d, int) else None for d in shape]


def _verify_signature(model_path: Path, session: ort.InferenceSession, manifest: Manifest) -> None:
    spec = manifest.input
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelLoadError(f"{model_path}: graph has {len(inputs)} inputs, expected one ({spec.name!r})")
    (inp,) = inputs
    if inp.name != spec.name:
        raise ModelLoadError(f"{model_path}: graph input is named {inp.name!r}, manifest says {spec.name!r}")
    if inp.type != _ORT_TYPES[spec.dtype]:
        raise ModelLoadError(f"{model_path}: graph input is {inp.type}, manifest says {spec.dtype}")
    dims = _static_dims(inp.shape)
    if len(dims) != 4:
        raise ModelLoadError(f"{model_path}: graph input has rank {len(dims)}, expected 4 (NHWC)")
    if dims[0] is not None and dims[0] >= 0:
        raise ModelLoadError(f"{model_path}: graph input has a fixed batch size {dims[0]}, expected dynamic")
    if tuple(dims[1:]) != spec.frame_shape:
        raise ModelLoadError(
            f"{model_path}: graph input frames are {dims[1:]} (H, W, C), "
            f"manifest says {list(spec.frame_shape)}"
        )

    _verify_map_spec(model_path, manifest)
    graph_outputs = {o.name: o for o in session.get_outputs()}
    for out in manifest.outputs:
        if out.name not in graph_outputs:
            raise ModelLoadError(
                f"{model_path}: graph has no output {out.name!r} (it has {sorted(graph_outputs)})"
            )
        got = graph_outputs[out.name]
        if got.type != _ORT_TYPES[out.dtype]:
            raise ModelLoadError(
                f"{model_path}: output {out.name!r} is {got.type}, manifest says {out.dtype}"
            )
        got_dims = _static_dims(got.shape)
        if len(got_dims) != len(out.shape):
            raise ModelLoadError(
                f"{model_path}: output {out.name!r} has rank {len(got_dims)}, manifest says {len(out.shape)}"
            )
        for axis, (g, m) in enumerate(zip(got_dims, out.shape, strict=True)):
            if isinstance(m, int) and g is not None and g != m:
                raise ModelLoadError(
                    f"{model_path}: output {out.name!r} axis {axis} is {g}, manifest says {m}"
                )
    extra = sorted(set(graph_outputs) - set(manifest.output_names))
    if extra:
        raise ModelLoadError(f"{model_path}: graph has outputs the manifest does not list: {extra}")


def _verify_map_spec(model_path: Path, manifest: Manifest) -> None:
    """An anomaly map is per input pixel, [N, H, W] of the model input (what /score?maps=true returns)."""
    spec = next((o for o in manifest.outputs if o.name == "anomaly_map"), None)
    if spec is None:
        return
    h, w = manifest.input.height, manifest.input.width
    fixed = zip(spec.shape[1:], (h, w), strict=False)
    if len(spec.shape) != 3 or any(isinstance(d, int) and d != want for d, want in fixed):
        raise ModelLoadError(
            f"{model_path}: manifest says anomaly_map is {spec.shape}; a map is [N, {h}, {w}], "
            "the model input's height and width"
        )


def warm_up(model: LoadedModel, batch_sizes: Sequence[int]) -> None:
    """Run dummy batches so the first real request does not pay for allocation and kernel selection.

    Also a last check that the graph really runs: a version that loads but fails here is refused.
    """
    for size in sorted(set(batch_sizes)) or [1]:
        try:
            outputs = model.score(np.zeros((size, *model.frame_shape), dtype=np.uint8))
        except Exception as exc:  # onnxruntime raises its own types for a graph that cannot run
            raise ModelLoadError(f"{model.path}: warm-up failed: {exc}") from exc
        if outputs["score"].shape != (size,):
            raise ModelLoadError(
                f"{model.path}: warm-up failed: score output has shape {list(outputs['score'].shape)} "
                f"for a batch of {size}"
            )


@dataclass(frozen=True)
class Refusal:
    """Why a version was refused, and what its files looked like then (see `version_fingerprint`)."""

    reason: str
    fingerprint: tuple[tuple[str, int, int], ...]


def version_fingerprint(path: Path) -> tuple[tuple[str, int, int], ...]:
    """(relative name, size, mtime_ns) of every file under a version folder: cheap, and it changes
    when a copy still in progress writes more bytes, when a file is replaced, added or removed."""
    if not path.is_dir():
        return ()
    entries = []
    for file in sorted(path.rglob("*")):
        with contextlib.suppress(OSError):  # a file removed between the listing and the stat
            if file.is_file():
                stat = file.stat()
                entries.append((str(file.relative_to(path)), stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


class ModelRegistry:
    """Versions on disk: which exist, which verify, and sessions for them. It holds no serving state:
    which version serves is the pool's table (`service/pool.py`); the CLI and batch scoring call
    `load()` for a one-off model.

    Refused versions are remembered with a fingerprint of their files, so a version that failed
    because it was still being copied is tried again once its files change (or when asked to retry,
    as `POST /admin/reload` does), and a truly broken one is not rebuilt on every poll.
    """

    def __init__(
        self,
        repo: Path | str,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        warmup_batch_sizes: Sequence[int] = (),
    ) -> None:
        self.repo = Path(repo)
        self.providers = resolve_providers(providers)
        self.intra_op_threads = intra_op_threads
        self.warmup_batch_sizes = list(warmup_batch_sizes)
        # "name/version" -> refusal. Written only by one load at a time (the pool's lock, or a CLI's own
        # registry); read through `failures`, which copies it first.
        self._refused: dict[str, Refusal] = {}

    def scan(self) -> dict[str, list[int]]:
        """Model names with their published versions (ascending); models with no version are left out."""
        if not self.repo.is_dir():
            return {}
        found = {}
        for child in sorted(self.repo.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                versions = list_versions(child)
                if versions:
                    found[child.name] = versions
        return found

    def latest_versions(self) -> dict[str, int]:
        """Highest published version per model (whether or not it verifies)."""
        return {name: versions[-1] for name, versions in self.scan().items()}

    @property
    def failures(self) -> dict[str, str]:
        """Every version refused and not loaded since, as "name/version" -> why."""
        # dict() copies in one step under the GIL: safe while a load in a worker thread adds to it.
        return {key: refusal.reason for key, refusal in dict(self._refused).items()}

    def load_version(self, name: str, version: int) -> LoadedModel:
        """Load exactly one version (and warm it up, if this registry warms); ModelLoadError, remembered
        as a refusal, if it does not verify or does not run."""
        path = self.repo / name / str(version)
        if not path.is_dir():
            raise ModelLoadError(f"{path}: no such model version")
        fingerprint = version_fingerprint(path)
        try:
            model = load_version(path, self.providers, self.intra_op_threads)
            if self.warmup_batch_sizes:
                warm_up(model, self.warmup_batch_sizes)
        except ModelLoadError as exc:
            self._refused[f"{name}/{version}"] = Refusal(str(exc), fingerprint)
            raise
        self._refused.pop(f"{name}/{version}", None)
        return model

    def load_newest(
        self, name: str, newer_than: int = 0, *, retry_refused: bool = False
    ) -> tuple[LoadedModel | None, dict[str, str]]:
        """The highest version above `newer_than` that verifies, and the versions refused on the way.

        A version refused before is skipped while its files are unchanged, unless `retry_refused`.
        The returned refusals are only the new ones (first refusal, or a different reason), so a
        poll does not report the same broken version again and again.
        """
        refused: dict[str, str] = {}
        for version in reversed(list_versions(self.repo / name)):
            if version <= newer_than:
                break
            key = f"{name}/{version}"
            before = self._refused.get(key)
            if (
                before is not None
                and not retry_refused
                and before.fingerprint == version_fingerprint(self.repo / name / str(version))
            ):
                continue
            try:
                return self.load_version(name, version), refused
            except ModelLoadError as exc:
                if before is None or before.reason != str(exc):
                    refused[key] = str(exc)
        return None, refused

    def load(self, name: str, version: int | None = None) -> LoadedModel:
        """`name` at `version`, or its highest version that verifies (broken ones skipped)."""
        if version is not None:
            return self.load_version(name, version)
        model, refused = self.load_newest(name, retry_refused=True)
        for key, reason in refused.items():
            log.error("refusing %s: %s", key, reason)
        if model is None:
            raise ModelLoadError(self._no_version_message(name))
        return model

    def _no_version_message(self, name: str) -> str:
        model_dir = self.repo / name
        if not list_versions(model_dir):
            return f"{model_dir}: no published version (expected integer folders with {MODEL_FILE})"
        reasons = [why for key, why in self.failures.items() if key.startswith(f"{name}/")]
        return f"{model_dir}: no version could be loaded: " + " | ".join(reasons)
