"""POST /score serves any H x W model by the rule its manifest names, on 16:9, 4:3 and square frames.

Each expected value is the published graph run directly by onnxruntime on
``resize_frame(decode_frame(bytes), size, rule)``: the contract's decode and resize, nothing of the
service. The graph weighs every pixel and channel differently (tests/service_helpers.py,
``build_weighted_graph``), so a frame resized by another rule, filter or offset scores differently.

Models: ``wide`` 64x36 (W x H, 16:9) and ``square`` 16x16 with the default rule (fit-pad-bilinear),
``legacy`` 16x16 whose manifest names the rule of models exported before it (center-crop-bilinear).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_helpers import (
    RunningServer,
    build_weighted_graph,
    onnx_outputs,
    publish_model,
    running_server,
    textured_png,
)

from contract.frames import (
    LEGACY_RESIZE_RULE,
    RESIZE_RULE,
    decode_frame,
    decode_resized,
    frame_size,
    resize_frame,
)

MODELS = {"wide": ("64x36", RESIZE_RULE), "square": (16, RESIZE_RULE), "legacy": (16, LEGACY_RESIZE_RULE)}
FRAMES = {  # name -> (width, height) of a camera frame
    "16:9": (192, 108),
    "4:3": (144, 108),
    "square": (108, 108),
}
REQUEST_PIXELS = 1_000_000
"""The server's decoded-pixel budget per request: two 1920x1080 JPEGs fit only at their draft scale."""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("resize") / "models"
    for seed, (name, (size, rule)) in enumerate(MODELS.items()):
        rule_field = None if rule == RESIZE_RULE else rule  # the default rule is the manifest's default
        graph = build_weighted_graph(size, seed=seed)
        publish_model(repo, name, 1, size=size, graph=graph, threshold=0.9, resize_rule=rule_field)
    return repo


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    settings = {"default_model": "wide", "max_pixels_per_request": REQUEST_PIXELS}
    with running_server(repo, settings, log_dir=repo.parent) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def frames_png() -> dict[str, bytes]:
    return {name: textured_png(w, h, seed=i) for i, (name, (w, h)) in enumerate(FRAMES.items())}


def expected(repo: Path, model: str, data: bytes, rule: str | None = None) -> dict[str, np.ndarray]:
    """onnxruntime on the contract's decode and resize of ``data`` (``rule`` defaults to the model's)."""
    size, own_rule = MODELS[model]
    return onnx_outputs(repo / model / "1", resize_frame(decode_frame(data), size, rule or own_rule))


def post(client: httpx.Client, model: str, frames: dict[str, bytes], **params: str) -> list[dict]:
    files = [("files", (f"{name}.png", data, "image/png")) for name, data in frames.items()]
    response = client.post("/score", params={"model": model, **params}, files=files)
    assert response.status_code == 200, response.text
    return response.json()["results"]


@pytest.mark.parametrize("model", list(MODELS))
def test_each_frame_scores_as_onnxruntime_on_the_manifests_resize_rule(
    client: httpx.Client, repo: Path, model: str
) -> None:
    frames = frames_png()
    results = post(client, model, frames)
    assert [r["key"] for r in results] == [f"{name}.png" for name in frames]
    _, rule = MODELS[model]
    other = LEGACY_RESIZE_RULE if rule == RESIZE_RULE else RESIZE_RULE
    for (name, data), result in zip(frames.items(), results, strict=True):
        want = float(expected(repo, model, data)["score"])
        assert result["score"] == pytest.approx(want, rel=1e-6, abs=1e-7), name
        size = frame_size(MODELS[model][0])
        same_aspect = FRAMES[name][0] * size.height == FRAMES[name][1] * size.width
        if not same_aspect:  # the two rules hand the model different pixels: the test tells them apart
            assert abs(float(expected(repo, model, data, other)["score"]) - want) > 1e-3, name


def test_maps_come_back_at_the_model_inputs_full_resolution_with_the_bars(
    client: httpx.Client, repo: Path
) -> None:
    frames = frames_png()
    results = post(client, "wide", frames, maps="true")
    for (name, data), result in zip(frames.items(), results, strict=True):
        heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["anomaly_map"]))))
        assert heat.shape == (36, 64) and heat.dtype == np.uint8, name  # [H, W] of the model input
        lo, hi = result["anomaly_map_min"], result["anomaly_map_max"]
        want = expected(repo, "wide", data)["anomaly_map"]
        assert (lo, hi) == pytest.approx((float(want.min()), float(want.max())), rel=1e-6, abs=1e-7)
        values = lo + heat.astype(np.float64) / 255 * (hi - lo)
        np.testing.assert_allclose(values, want, atol=(hi - lo) / 255 * 0.51 + 1e-6, err_msg=name)
    # Fit-pad bars are part of the map: the square frame sits in the middle 36 columns, black around it.
    square = np.asarray(Image.open(io.BytesIO(base64.b64decode(results[2]["anomaly_map"]))))
    assert results[2]["anomaly_map_min"] == 0.0
    assert (square[:, :14] == 0).all() and (square[:, 50:] == 0).all() and (square[:, 14:50] > 0).mean() > 0.9


def test_a_camera_jpeg_is_drafted_for_the_models_h_x_w_and_counted_so(
    client: httpx.Client, repo: Path
) -> None:
    # 1920x1080 for a 64x36 model: Pillow's draft decodes it at 1/8 (240x135), and the request budget
    # counts those pixels, so two of them fit in 1 M decoded pixels though they hold 4.1 M.
    jpegs = {f"cam{i}": textured_png(1920, 1080, seed=10 + i, fmt="JPEG", quality=90) for i in range(2)}
    files = [("files", (f"{name}.jpg", data, "image/jpeg")) for name, data in jpegs.items()]
    response = client.post("/score", params={"model": "wide"}, files=files)
    assert response.status_code == 200, response.text
    for (name, data), result in zip(jpegs.items(), response.json()["results"], strict=True):
        want = onnx_outputs(repo / "wide" / "1", decode_resized(data, "64x36", rule=RESIZE_RULE))["score"]
        assert result["score"] == pytest.approx(float(want), rel=1e-6, abs=1e-7), name
    # The same pixels as PNG have no draft mode: 2 M decoded pixels, over the budget, refused up front.
    png = textured_png(1920, 1080, seed=12)
    refused = client.post(
        "/score", params={"model": "wide"}, content=png, headers={"Content-Type": "image/png"}
    )
    assert refused.status_code == 413 and "decoded pixels" in refused.text


def test_models_says_each_models_size_and_rule(client: httpx.Client) -> None:
    described = {m["name"]: m["input"] for m in client.get("/models").json()["models"]}
    assert {name: (i["width"], i["height"], i["resize_rule"]) for name, i in described.items()} == {
        "wide": (64, 36, RESIZE_RULE),
        "square": (16, 16, RESIZE_RULE),
        "legacy": (16, 16, LEGACY_RESIZE_RULE),
    }
