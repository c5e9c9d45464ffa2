"""API keys: scoring, admin and flagged routes need a bearer token; probes and metrics stay open."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from service_helpers import RunningServer, publish_model, running_server, solid_png

KEYS = ["first-key", "second-key"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("auth")
    publish_model(root / "models", "bright", 1)
    with running_server(root / "models", {"api_keys": KEYS}, log_dir=root) as running:
        yield running


PNG = {"content": solid_png(20), "headers": {"Content-Type": "image/png"}}
GUARDED = [("POST", "/score"), ("POST", "/admin/reload"), ("GET", "/flagged")]


@pytest.mark.parametrize(("method", "path"), GUARDED)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Basic Zmlyc3Qta2V5Og==", "Bearer"])
def test_guarded_routes_refuse_a_missing_or_wrong_key_with_401(
    server: RunningServer, method: str, path: str, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.request(method, f"{server.url}{path}", headers=headers, timeout=10)
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["error"] == "unauthorized"


@pytest.mark.parametrize("key", KEYS)
def test_any_configured_key_opens_the_guarded_routes(server: RunningServer, key: str) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    with server.client(headers=auth) as client:
        assert client.post("/score", **PNG).status_code == 200
        assert client.post("/admin/reload").status_code == 200
        assert client.get("/flagged").status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json"])
def test_probes_and_metrics_need_no_key(server: RunningServer, path: str) -> None:
    assert httpx.get(f"{server.url}{path}", timeout=10).status_code == 200


def test_the_spec_declares_the_bearer_scheme_and_401_on_guarded_routes(server: RunningServer) -> None:
    spec = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "401" in spec["paths"]["/score"]["post"]["responses"]
    assert spec["paths"]["/score"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
