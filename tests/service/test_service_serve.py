"""`edgecase serve`: flags reach the app (through EDGECASE_* for the workers); bad input fails clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
from service_helpers import REPO_ROOT, free_port, publish_model, server_env, solid_png, wait_until

# The installed console script, as a user runs it.
EDGECASE = str(Path(sys.executable).with_name("edgecase"))


def test_a_missing_repository_is_a_one_line_error_with_exit_code_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [EDGECASE, "serve", "--repo", str(tmp_path / "nope")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_invalid_settings_are_refused_before_uvicorn_starts(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    command = [EDGECASE, "serve", "--repo", str(tmp_path / "models")]
    command += ["--max-batch-size", "64", "--max-queue-frames", "8"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "max_queue_frames" in result.stderr


def test_flags_configure_the_server(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    publish_model(repo, "first", 1)
    publish_model(repo, "second", 1)
    port = free_port()
    command = [EDGECASE, "serve", "--repo", str(repo), "--port", str(port)]
    command += ["--model", "second", "--api-key", "abc", "--reload-poll-s", "0", "--log-level", "warning"]
    env = server_env(repo, tmp=tmp_path)
    with open(tmp_path / "serve.log", "wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(ready, timeout=60), (tmp_path / "serve.log").read_text()
        png = {"content": solid_png(9), "headers": {"Content-Type": "image/png"}}
        assert httpx.post(f"{base}/score", **png).status_code == 401
        png["headers"]["Authorization"] = "Bearer abc"
        assert httpx.post(f"{base}/score", **png).json()["model"] == "second"
    finally:
        process.terminate()
        # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells what stopped it.
        assert process.wait(30) in (0, -15)
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
