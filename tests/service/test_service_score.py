"""POST /score against a real uvicorn server: every input format, order, resizing, maps, models/versions.

The test model scores a frame by its mean brightness / 255 (see tests/service_helpers.py), so a solid
grey frame of value v scores v / 255 and is an edge case when v / 255 >= 0.5.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image
from service_helpers import DEFAULT_CALIBRATION, RunningServer, publish_model, running_server, solid_png

from contract.frames import RESIZE_RULE, resize_frame


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("score")
    repo = root / "models"
    publish_model(repo, "bright", 1, size=8, threshold=0.5)
    publish_model(repo, "bright", 2, size=8, threshold=0.25)
    publish_model(repo, "plain", 1, size=16, with_map=False, threshold=0.5)
    with running_server(repo, {"default_model": "bright"}, log_dir=root) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def expected_p_value(score: float) -> float:
    return (1 + sum(c >= score for c in DEFAULT_CALIBRATION)) / (len(DEFAULT_CALIBRATION) + 1)


def test_multipart_frames_come_back_in_request_order_keyed_by_filename(client: httpx.Client) -> None:
    values = [10, 250, 128, 0, 200]
    files = [("files", (f"cam{i}.png", solid_png(v), "image/png")) for i, v in enumerate(values)]
    response = client.post("/score", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "bright" and body["version"] == 2
    assert [r["key"] for r in body["results"]] == [f"cam{i}.png" for i in range(len(values))]
    for value, result in zip(values, body["results"], strict=True):
        assert result["score"] == pytest.approx(value / 255, abs=1e-6)
        assert result["p_value"] == pytest.approx(expected_p_value(result["score"]))
        assert result["threshold"] == 0.25
        assert result["is_edge_case"] == (value / 255 > 0.25)
        assert (result["model"], result["version"]) == ("bright", 2)
        assert ("flagged_id" in result) == result["is_edge_case"]


@pytest.mark.parametrize(
    ("media_type", "fmt"), [("image/png", "PNG"), ("image/jpeg", "JPEG"), ("image/webp", "WEBP")]
)
def test_a_raw_image_body_is_one_frame_with_key_0(client: httpx.Client, media_type: str, fmt: str) -> None:
    response = client.post("/score", content=solid_png(40, fmt=fmt), headers={"Content-Type": media_type})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["key"] == "0"
    assert result["score"] == pytest.approx(40 / 255, abs=2 / 255)  # lossy formats move a grey level


def test_json_frames_keep_client_keys_and_default_to_the_index(client: httpx.Client) -> None:
    def b64(value: int) -> str:
        return base64.b64encode(solid_png(value)).decode()

    frames = [
        {"key": "front/000001", "image": b64(20)},
        {"image": b64(220)},
        {"key": "rear", "image": b64(90)},
    ]
    response = client.post("/score", json={"frames": frames})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["key"] for r in results] == ["front/000001", "1", "rear"]
    assert [round(r["score"] * 255) for r in results] == [20, 220, 90]


def test_frames_of_another_size_are_resized_by_the_manifest_rule(client: httpx.Client) -> None:
    files = [
        ("files", ("small.png", solid_png(100, size=4))),
        ("files", ("wide.png", solid_png(100, size=6, width=30))),
        ("files", ("big.png", solid_png(100, size=64))),
    ]
    results = client.post("/score", files=files).json()["results"]
    # fit-pad-bilinear: the whole 6x30 frame becomes a 2x8 band of the 8x8 input, the rest black bars.
    assert [r["score"] for r in results] == pytest.approx([100 / 255, 100 / 255 * 2 / 8, 100 / 255], abs=1e-6)


def test_the_whole_frame_is_scored_not_its_centre(client: httpx.Client) -> None:
    # A 8x24 frame: dark left and right thirds, bright centre. A centre crop would keep only the bright
    # part (score 1); fit-pad keeps all three thirds, resized into a band of the square input.
    pixels = np.zeros((8, 24, 3), dtype=np.uint8)
    pixels[:, 8:16] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    response = client.post("/score", content=buffer.getvalue(), headers={"Content-Type": "image/png"})
    seen = resize_frame(pixels, 8, RESIZE_RULE)
    assert response.json()["results"][0]["score"] == pytest.approx(seen.mean() / 255, abs=1e-6)
    assert seen.mean() / 255 < 0.2


def test_maps_are_base64_grey_pngs_with_their_value_range(client: httpx.Client) -> None:
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[:4] = 200  # top half bright
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    response = client.post(
        "/score", params={"maps": "true"}, content=buffer.getvalue(), headers={"Content-Type": "image/png"}
    )
    (result,) = response.json()["results"]
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["anomaly_map"]))))
    assert heat.shape == (8, 8) and heat.dtype == np.uint8
    assert (heat[:4] == 255).all() and (heat[4:] == 0).all()  # min-max scaled per frame
    assert result["anomaly_map_min"] == pytest.approx(0.0)
    assert result["anomaly_map_max"] == pytest.approx(200 / 255)


def test_no_maps_unless_asked_and_none_for_a_head_without_one(client: httpx.Client) -> None:
    png = {"content": solid_png(50), "headers": {"Content-Type": "image/png"}}
    assert "anomaly_map" not in client.post("/score", **png).json()["results"][0]
    plain = client.post("/score", params={"model": "plain", "maps": "true"}, **png).json()
    assert plain["model"] == "plain" and "anomaly_map" not in plain["results"][0]


def test_an_older_version_can_be_asked_for_explicitly(client: httpx.Client) -> None:
    png = {"content": solid_png(100), "headers": {"Content-Type": "image/png"}}
    old = client.post("/score", params={"model": "bright", "version": 1}, **png).json()
    new = client.post("/score", params={"model": "bright"}, **png).json()
    assert (old["version"], old["results"][0]["threshold"], old["results"][0]["is_edge_case"]) == (
        1,
        0.5,
        False,
    )
    assert (new["version"], new["results"][0]["threshold"], new["results"][0]["is_edge_case"]) == (
        2,
        0.25,
        True,
    )


def test_an_edge_case_is_in_the_flagged_store_when_the_response_arrives(
    client: httpx.Client, server: RunningServer
) -> None:
    png = solid_png(240)
    result = client.post("/score", files=[("files", ("night.png", png))]).json()["results"][0]
    assert result["is_edge_case"]
    image = client.get(f"/flagged/{result['flagged_id']}/image")
    assert image.status_code == 200 and image.content == png  # stored as sent, byte for byte


def test_models_lists_versions_providers_thresholds_and_input_spec(client: httpx.Client) -> None:
    body = client.get("/models").json()
    assert body["default_model"] == "bright"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"bright", "plain"}
    bright = by_name["bright"]
    assert bright["version"] == 2 and bright["available_versions"] == [1, 2] and bright["default"]
    assert bright["providers"] == ["CPUExecutionProvider"]
    assert bright["threshold"] == 0.25 and bright["units"] == "fraction" and bright["head"] == "brightness"
    assert bright["input"] == {
        "height": 8,
        "width": 8,
        "channels": 3,
        "dtype": "uint8",
        "layout": "NHWC",
        "resize_rule": "fit-pad-bilinear",
    }
    assert bright["has_anomaly_map"] and not by_name["plain"]["has_anomaly_map"]


def test_health_and_readiness(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["serving"] == {"bright": 2, "plain": 1}


def test_the_server_log_names_the_provider_and_holds_no_warning(server: RunningServer) -> None:
    log = server.log()
    assert "CPUExecutionProvider" in log
    # The server runs in a subprocess, outside pytest's warnings-as-errors: check its output instead.
    assert "Warning" not in log and "Traceback" not in log, log


def test_large_requests_score_the_same_whatever_the_format(client: httpx.Client) -> None:
    # Noisy 64x64 frames (~12 kB each as PNG): big enough that parsing and decoding leave the event loop.
    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(8):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    assert sum(map(len, pngs)) > 64 * 1024
    as_json = {"frames": [{"key": str(i), "image": base64.b64encode(p).decode()} for i, p in enumerate(pngs)]}
    json_scores = [r["score"] for r in client.post("/score", json=as_json).json()["results"]]
    files = [("files", (str(i), p)) for i, p in enumerate(pngs)]
    multipart_scores = [r["score"] for r in client.post("/score", files=files).json()["results"]]
    single_scores = [
        client.post("/score", content=p, headers={"Content-Type": "image/png"}).json()["results"][0]["score"]
        for p in pngs
    ]
    assert json_scores == multipart_scores == single_scores
    assert len(set(json_scores)) == 8, "different frames, different scores"
