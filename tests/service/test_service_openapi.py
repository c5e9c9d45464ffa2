"""The OpenAPI spec says what the server really does: declared bodies and errors, checked by schemathesis.

schemathesis (4.x CLI, against the live server) generates requests from the spec, including broken ones,
and checks: no 5xx, every status code documented, response bodies, headers and content types as
declared. `negative_data_rejection` is left out on purpose: the service ignores unknown query
parameters, as most HTTP APIs do, and that check counts ignoring them as a failure.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_helpers import RunningServer, publish_model, running_server

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("openapi")
    publish_model(root / "models", "bright", 1)
    with running_server(root / "models", log_dir=root) as running:
        yield running


def run_schemathesis(server: RunningServer, cwd: Path, max_examples: int, *extra: str) -> None:
    schemathesis = Path(sys.executable).with_name("schemathesis")
    command = [str(schemathesis), "run", f"{server.url}/openapi.json", "--checks", CHECKS]
    command += ["--max-examples", str(max_examples), "--workers", "1", "--seed", "7", "--no-color", *extra]
    # cwd: schemathesis keeps its example database and reports in the working directory.
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "passed" in result.stdout


def test_score_declares_all_three_request_shapes_and_every_error(server: RunningServer) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    score = spec["paths"]["/score"]["post"]
    assert set(score["requestBody"]["content"]) == {
        "multipart/form-data",
        "image/png",
        "image/jpeg",
        "image/webp",
        "application/json",
    }
    assert {"404", "413", "415", "422", "429", "500", "503"} <= set(score["responses"])
    assert "401" not in score["responses"], "with no API keys configured no route can answer 401"
    error = score["responses"]["413"]["content"]["application/json"]["schema"]["$ref"]
    assert error == "#/components/schemas/ErrorBody"
    assert "ScoreJSONRequest" in spec["components"]["schemas"]
    assert "FrameIn" in spec["components"]["schemas"]


def test_schemathesis_finds_no_server_errors_and_no_schema_violations(
    server: RunningServer, tmp_path: Path
) -> None:
    run_schemathesis(server, tmp_path, max_examples=25)
    assert "Traceback" not in server.log()


@pytest.mark.slow
def test_schemathesis_longer_run_with_api_keys(tmp_path: Path) -> None:
    publish_model(tmp_path / "models", "bright", 1)
    with running_server(tmp_path / "models", {"api_keys": ["k"]}, log_dir=tmp_path) as server:
        run_schemathesis(server, tmp_path, 100, "--header", "Authorization: Bearer k")
