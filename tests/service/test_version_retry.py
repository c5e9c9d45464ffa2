"""A refused model version is not refused for good: it is tried again when its files change (a copy
that was still in progress when the poller first saw it), and whenever POST /admin/reload asks.
/models lists refused versions with the reason. Before this, a refused version was remembered
forever and never retried, not even by /admin/reload.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
from service_helpers import publish_model, running_server, solid_png, wait_until

from contract.manifest import MODEL_FILE

PNG = {"content": solid_png(20), "headers": {"Content-Type": "image/png"}}


def serving_version(client: httpx.Client) -> int:
    return int(client.get("/readyz").json()["serving"]["bright"])


def test_a_version_seen_half_copied_is_loaded_once_the_copy_completes(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1)
    complete = publish_model(tmp_path / "staging", "bright", 2)
    with (
        running_server(repo, {"reload_poll_s": 0.2}, log_dir=tmp_path) as server,
        server.client() as client,
    ):
        # A plain copy into place (not a rename): the poller sees the folder before model.onnx is whole.
        target = repo / "bright" / "2"
        target.mkdir()
        shutil.copy2(complete / "manifest.json", target / "manifest.json")
        graph = (complete / MODEL_FILE).read_bytes()
        (target / MODEL_FILE).write_bytes(graph[: len(graph) // 2])

        def refused_half_copy() -> bool:
            models = client.get("/models").json()["models"]
            return "truncated" in models[0]["refused_versions"].get("2", "")

        assert wait_until(refused_half_copy, timeout=20), server.log()
        assert serving_version(client) == 1

        (target / MODEL_FILE).write_bytes(graph)  # the copy completes: size and mtime change
        assert wait_until(lambda: serving_version(client) == 2, timeout=20), server.log()
        scored = client.post("/score", **PNG)
        assert scored.status_code == 200 and scored.json()["version"] == 2
        assert client.get("/models").json()["models"][0]["refused_versions"] == {}


def test_admin_reload_retries_a_refused_version_even_when_its_files_look_unchanged(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1)
    version = publish_model(repo, "bright", 2)
    model_file = version / MODEL_FILE
    good = model_file.read_bytes()
    stat = model_file.stat()
    # Same size, same mtime, wrong bytes: only the hash check can tell (e.g. a bad block on a mount).
    model_file.write_bytes(bytes(len(good)))
    os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with running_server(repo, log_dir=tmp_path) as server, server.client() as client:
        assert serving_version(client) == 1
        refused = client.get("/models").json()["models"][0]["refused_versions"]
        assert "sha256" in refused["2"]

        model_file.write_bytes(good)  # repaired in place, with the same size and mtime as before
        os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        report = client.post("/admin/reload").json()
        assert report["loaded"] == ["bright/2"] and report["serving"] == {"bright": 2}
        scored = client.post("/score", **PNG)
        assert scored.status_code == 200 and scored.json()["version"] == 2
