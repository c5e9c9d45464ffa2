"""Shared fixtures for the service tests: tiny real ONNX score graphs, a model repo, a real server.

Everything here is real: graphs are built with the `onnx` helper API and loaded by onnxruntime, the
manifest validates against `contract.manifest.Manifest`, and the server is uvicorn in a subprocess
on a free loopback port, talked to over HTTP. No torch.

The test graph ("brightness"): `anomaly_map = mean over RGB of frames / 255` (shape [N, H, W]) and
`score = mean of anomaly_map` (shape [N]), so a frame's score is its mean brightness in [0, 1]:
a black frame scores 0, a white frame 1. With the default threshold 0.5, bright frames are edge cases.
Sizes are anything `contract.frames.frame_size` reads: `8` (8x8), `"64x36"` (W x H) or `(36, 64)`.

The "weighted" graph (`build_weighted_graph`) is the brightness graph with a fixed random weight per
pixel and channel, so its score moves when any pixel moves: the graph that pins which pixels a resize
rule hands the model (`onnx_outputs` runs it directly, for the expected values).

Stable names used by other test modules: `build_brightness_graph`, `build_weighted_graph`,
`build_failing_graph`, `publish_model`, `publish_broken`, `solid_png`, `textured_png`, `onnx_outputs`,
`free_port`, `start_server`, `running_server`, `RunningServer`, `wait_until`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper
from PIL import Image

from contract.frames import frame_size
from contract.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, file_entry, quantiles_of
from service.launch import free_port, responds, wait_until

REPO_ROOT = Path(__file__).resolve().parents[1]

# Held-out "normal" scores for the brightness graph: mid-grey frames with a little spread.
DEFAULT_CALIBRATION = [round(0.30 + 0.01 * i, 2) for i in range(20)]


Size = int | str | tuple[int, int]


def build_brightness_graph(size: Size = 8, *, with_map: bool = True, opset: int = 17) -> bytes:
    """Serialized ONNX graph: uint8 NHWC [N, H, W, 3] -> score [N] (+ anomaly_map [N, H, W])."""
    h, w = frame_size(size)
    frames = helper.make_tensor_value_info("frames", TensorProto.UINT8, ["N", h, w, 3])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])
    outputs = [score]
    nodes = [
        helper.make_node("Cast", ["frames"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["as_float"], ["channel_mean"], axes=[3], keepdims=0),
        helper.make_node("Div", ["channel_mean", "scale"], ["map"]),
        helper.make_node("ReduceMean", ["map"], ["score"], axes=[1, 2], keepdims=0),
    ]
    if with_map:
        nodes.append(helper.make_node("Identity", ["map"], ["anomaly_map"]))
        outputs.append(helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", h, w]))
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [255.0])
    graph = helper.make_graph(nodes, "brightness", [frames], outputs, initializer=[scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def build_weighted_graph(size: Size, *, seed: int = 0) -> bytes:
    """uint8 NHWC [N, H, W, 3] -> anomaly_map [N, H, W] = mean over RGB of frames * weights / 255, and
    score [N] = its mean; weights fixed, uniform in [0, 1) per pixel and channel (from ``seed``)."""
    h, w = frame_size(size)
    weights = np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)
    frames = helper.make_tensor_value_info("frames", TensorProto.UINT8, ["N", h, w, 3])
    nodes = [
        helper.make_node("Cast", ["frames"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["as_float", "weights"], ["weighted"]),
        helper.make_node("ReduceMean", ["weighted"], ["channel_mean"], axes=[3], keepdims=0),
        helper.make_node("Div", ["channel_mean", "scale"], ["anomaly_map"]),
        helper.make_node("ReduceMean", ["anomaly_map"], ["score"], axes=[1, 2], keepdims=0),
    ]
    initializers = [
        helper.make_tensor("weights", TensorProto.FLOAT, [h, w, 3], weights.ravel().tolist()),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [255.0]),
    ]
    outputs = [
        helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", h, w]),
    ]
    graph = helper.make_graph(nodes, "weighted", [frames], outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def onnx_outputs(version_dir: Path, frame: np.ndarray) -> dict[str, np.ndarray]:
    """A published graph run directly by onnxruntime (a session of its own) on one uint8 (H, W, 3) frame:
    output name -> value for that frame (score a float array of shape (), anomaly_map [H, W])."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(Path(version_dir) / MODEL_FILE), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {"frames": np.ascontiguousarray(frame[None])})
    return {name: value[0] for name, value in zip(names, values, strict=True)}


def build_failing_graph(size: int = 8) -> bytes:
    """A graph that loads and matches the manifest but fails on every run (Gather index out of range)."""
    frames = helper.make_tensor_value_info("frames", TensorProto.UINT8, ["N", size, size, 3])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])
    anomaly_map = helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", size, size])
    nodes = [
        helper.make_node("Cast", ["frames"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["as_float"], ["anomaly_map"], axes=[3], keepdims=0),
        helper.make_node("Gather", ["anomaly_map", "bad_index"], ["row"], axis=1),
        helper.make_node("ReduceMean", ["row"], ["score"], axes=[1], keepdims=0),
    ]
    bad_index = helper.make_tensor("bad_index", TensorProto.INT64, [], [size + 1000])
    graph = helper.make_graph(nodes, "failing", [frames], [score, anomaly_map], initializer=[bad_index])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def manifest_for(
    name: str,
    version: int,
    model_bytes_path: Path,
    *,
    size: Size,
    threshold: float,
    with_map: bool,
    calibration: list[float],
    resize_rule: str | None = None,
) -> Manifest:
    """A valid manifest for a brightness graph already written at `model_bytes_path`.

    `resize_rule` None leaves the field out: the schema's default (fit-pad-bilinear) applies.
    """
    h, w = frame_size(size)
    scores = sorted(calibration)
    outputs: list[dict[str, Any]] = [{"name": "score", "shape": ["N"]}]
    if with_map:
        outputs.append({"name": "anomaly_map", "shape": ["N", h, w]})
    model_input: dict[str, Any] = {"height": h, "width": w}
    if resize_rule is not None:
        model_input["resize_rule"] = resize_rule
    return Manifest.model_validate(
        {
            "schema_version": 1,
            "name": name,
            "version": version,
            "created_at": "2026-01-01T00:00:00Z",
            "model": {
                "kind": "test",
                "head": "brightness",
                "definition": "mean pixel brightness / 255 (a test graph)",
                "units": "fraction",
            },
            "input": model_input,
            "outputs": outputs,
            "threshold": {"value": threshold, "target_fpr": 0.05, "calibration_n": len(scores)},
            "calibration": {"n": len(scores), "quantiles": quantiles_of(scores), "scores": scores},
            "training": {"run_dir": "tests/none"},
            "export": {
                "opset": 17,
                "exporter": "onnx.helper (tests)",
                "torch_version": "none",
                "onnx_version": onnx.__version__,
                "onnxruntime_version": "any",
                "parity": {"max_rel_diff": 0.0, "eps": 1e-6, "n_frames": 1},
            },
            "files": {MODEL_FILE: file_entry(model_bytes_path).model_dump()},
        }
    )


def publish_model(
    repo: Path,
    name: str = "bright",
    version: int = 1,
    *,
    size: Size = 8,
    threshold: float = 0.5,
    with_map: bool = True,
    calibration: list[float] | None = None,
    graph: bytes | None = None,
    resize_rule: str | None = None,
) -> Path:
    """Write `repo/name/version/{model.onnx,manifest.json}` atomically (temp dot-folder, then rename).

    `size` is the model input (8, "64x36" or (36, 64)); `resize_rule` names a rule in the manifest
    (None: the schema's default, fit-pad-bilinear).

    `graph` replaces the brightness graph (e.g. garbage bytes); the manifest still lists its true hash,
    so only onnxruntime can refuse it.
    """
    final = Path(repo) / name / str(version)
    if final.exists():
        raise FileExistsError(f"{final} already published (versions are immutable)")
    tmp = Path(repo) / name / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model_path = tmp / MODEL_FILE
    model_path.write_bytes(graph if graph is not None else build_brightness_graph(size, with_map=with_map))
    manifest = manifest_for(
        name,
        version,
        model_path,
        size=size,
        threshold=threshold,
        with_map=with_map,
        calibration=calibration if calibration is not None else DEFAULT_CALIBRATION,
        resize_rule=resize_rule,
    )
    manifest.write(tmp / MANIFEST_FILE)
    tmp.rename(final)
    return final


def publish_broken(
    repo: Path,
    name: str = "bright",
    version: int = 2,
    *,
    how: Literal["graph", "hash", "shape", "runtime"] = "graph",
    size: int = 8,
) -> Path:
    """Publish a version that must be refused at load time.

    graph: model.onnx is not an ONNX graph (hash matches, onnxruntime fails);
    hash: the manifest's sha256 does not match model.onnx;
    shape: the manifest promises a different input size than the graph has;
    runtime: a valid graph that matches its manifest but fails when run (only warm-up can catch it).
    """
    if how == "runtime":
        return publish_model(repo, name, version, size=size, graph=build_failing_graph(size))
    if how == "graph":
        return publish_model(repo, name, version, size=size, graph=b"this is not an onnx graph")
    path = publish_model(repo, name, version, size=size)
    data = json.loads((path / MANIFEST_FILE).read_text())
    if how == "hash":
        data["files"][MODEL_FILE]["sha256"] = "0" * 64
    elif how == "shape":
        data["input"]["height"] = data["input"]["width"] = size * 2
    else:
        raise ValueError(f"unknown breakage {how!r}")
    (path / MANIFEST_FILE).write_text(json.dumps(data))
    return path


def solid_png(value: int, size: int = 8, *, width: int | None = None, fmt: str = "PNG") -> bytes:
    """A solid grey frame (all channels = value) encoded as PNG/JPEG/WEBP; score ~ value / 255."""
    array = np.full((size, width or size, 3), value, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def textured_png(width: int, height: int, *, seed: int = 0, fmt: str = "PNG", **save: Any) -> bytes:
    """A ``width x height`` frame with structure at every scale (gradients + blocks + noise): any change
    of which pixels a resize keeps, or how it filters them, changes a weighted graph's score."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([255 * xs / max(1, width - 1), 255 * ys / max(1, height - 1), 128 + 0 * xs], axis=2)
    blocks = rng.integers(-60, 61, (height // 8 + 1, width // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)
    noise = rng.normal(0, 25, (height, width, 3))
    array = np.clip(base + blocks[:height, :width] + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save)
    return buffer.getvalue()


@dataclass
class RunningServer:
    """A uvicorn subprocess serving the edgecase app on loopback."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    env: dict[str, str] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        """An httpx client bound to this server (caller closes it, or uses `with`)."""
        kwargs.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.url, **kwargs)

    def log(self) -> str:
        """Everything the server printed so far (for assertion messages)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def is_ready(self) -> bool:
        return responds(self.url, "/readyz")

    def is_alive(self) -> bool:
        return responds(self.url, "/healthz")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful: in-flight requests finish), then SIGKILL if it hangs; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return int(self.process.returncode)

    def kill(self) -> None:
        """SIGKILL, no cleanup: what a crash looks like."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(15.0)


def server_env(
    repo: Path, settings: Mapping[str, object] | None = None, tmp: Path | None = None
) -> dict[str, str]:
    """Environment for a server process: EDGECASE_* from `settings` (keys without the prefix)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECASE_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["EDGECASE_REPO"] = str(repo)
    env["EDGECASE_FLAGGED_DIR"] = str((tmp or Path(repo).parent) / "flagged")
    env["EDGECASE_RELOAD_POLL_S"] = "0"
    # Tests share two cores with other work: one onnxruntime thread keeps timings predictable.
    env["EDGECASE_INTRA_OP_THREADS"] = "1"
    for key, value in (settings or {}).items():
        env[f"EDGECASE_{key.upper()}"] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return env


def start_server(
    repo: Path,
    settings: Mapping[str, object] | None = None,
    *,
    workers: int = 1,
    via_cli: bool = False,
    wait: Literal["ready", "alive", "none"] = "ready",
    timeout: float = 60.0,
    log_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> RunningServer:
    """Start the app on a free loopback port and wait until it is ready (or alive, or not at all).

    `settings` are Settings field names -> values, passed as EDGECASE_* env vars. `via_cli` starts it
    with `edgecase serve` (needed for workers > 1); otherwise `uvicorn --factory` directly. `env` adds
    other environment variables (e.g. PROMETHEUS_MULTIPROC_DIR).
    """
    port = free_port()
    extra_env = dict(env or {})
    env = server_env(Path(repo), settings, log_dir) | extra_env
    log_path = Path(log_dir or Path(repo).parent) / f"server-{port}.log"
    if via_cli or workers > 1:
        cmd = [sys.executable, "-m", "edgecase.cli", "serve", "--repo", str(repo)]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    else:
        cmd = [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory"]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = RunningServer(process=process, port=port, log_path=log_path, env=env)
    check = {"ready": server.is_ready, "alive": server.is_alive}.get(wait)
    if check is not None and not wait_until(lambda: check() or process.poll() is not None, timeout):
        server.stop()
        raise RuntimeError(f"server not {wait} after {timeout}s; log:\n{server.log()}")
    if process.poll() is not None:
        raise RuntimeError(f"server exited with {process.returncode}; log:\n{server.log()}")
    return server


@contextlib.contextmanager
def running_server(
    repo: Path, settings: Mapping[str, object] | None = None, **kwargs: Any
) -> Iterator[RunningServer]:
    """`start_server` as a context manager that always stops the process."""
    server = start_server(repo, settings, **kwargs)
    try:
        yield server
    finally:
        server.stop()
