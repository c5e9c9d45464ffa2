"""The whole loop on real code, small: synth -> train (dry run) -> export -> serve -> POST /score ->
flagged store -> review -> ``flagged export`` -> ``train --data`` on the export (dry run).

Every step is the command a user types (``edgecase.cli.main``, in-process so torch loads once), and
the server is a real uvicorn process on loopback (service_helpers.running_server), scored over HTTP.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from PIL import Image
from service_helpers import running_server

from contract.labels import read_labels
from contract.manifest import load_manifest
from edgecase.cli import main

SIZE = 32
TRAIN = ["--dry-run", "--size", str(SIZE), "--width", "8", "--device", "cpu"]


def png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


# `edgecase export` uses the TorchScript exporter (dynamo=False: seconds instead of tens of seconds per
# graph); torch >= 2.9 flags it, and a helper it calls, with DeprecationWarnings we expect.
@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
@pytest.mark.slow
def test_synth_train_export_serve_flag_review_export_and_retrain(tmp_path: Path) -> None:
    synth, run, repo, store = tmp_path / "synth", tmp_path / "run", tmp_path / "models", tmp_path / "flagged"
    assert (
        main(
            ["synth", "--out", str(synth), "--size", str(SIZE), "--n-normal", "24", "--n-val", "8"]
            + ["--n-test-normal", "4", "--n-per-family", "2", "--families", "fog", "--no-progress"]
        )
        == 0
    )
    assert main(["train", "vae", "--data", str(synth), "--out", str(run), *TRAIN]) == 0
    assert (run / "calibration" / "vae-elbo.json").is_file()  # fit_heads ran at the end of training

    # vae-elbo: a likelihood, so frames of uniform noise are far above any normal frame even for the
    # one-batch network of a dry run.
    assert main(["export", str(run), "--head", "vae-elbo", "--repo", str(repo), "--name", "e2e"]) == 0
    manifest = load_manifest(repo / "e2e" / "1")
    assert manifest.model.head == "vae-elbo" and manifest.input.height == SIZE

    noise = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    files = [("files", (f"noise{i}.png", png(frame), "image/png")) for i, frame in enumerate(noise)]
    with running_server(repo, {"flagged_dir": str(store)}, log_dir=tmp_path) as server:
        with server.client() as client:
            response = client.post("/score", files=files)
        assert response.status_code == 200, f"{response.text}\n{server.log()}"
        results = response.json()["results"]
    assert [r["key"] for r in results] == ["noise0.png", "noise1.png", "noise2.png"]
    flagged = [r for r in results if r["is_edge_case"]]
    assert flagged, results
    for result in flagged:
        assert result["score"] > result["threshold"] and result["flagged_id"] is not None
        assert result["p_value"] == pytest.approx(1 / (manifest.calibration.n + 1))

    # A reviewer calls the first one a false alarm: it goes back into the normal training set.
    first = flagged[0]["flagged_id"]
    assert main(["flagged", "review", str(first), "normal", "--store", str(store)]) == 0
    reviewed = tmp_path / "reviewed"
    export = ["flagged", "export", "--review", "normal", "--out", str(reviewed), "--store", str(store)]
    assert main(export) == 0
    rows = read_labels(reviewed)
    assert [(row.split, row.family) for row in rows] == [("train", "normal")]

    retrained = tmp_path / "run2"
    assert (
        main(["train", "vae", "--data", str(synth), "--data", str(reviewed), "--out", str(retrained), *TRAIN])
        == 0
    )
    config = json.loads((retrained / "config.json").read_text())
    assert config["data"] == [str(synth), str(reviewed)]
    assert (retrained / "model.pt").is_file()
