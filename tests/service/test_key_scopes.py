"""API keys have scopes: `score` (POST /score), `review` (the /flagged routes), `admin` (POST
/admin/reload); a key with no scope prefix has them all. A scoring key cannot relabel flags. The key is
checked before any body is read, keys can come from a file (so they are not in `ps`), and the entry
syntax is strict. Before this, any key opened every route, and a review body was read in full before
the key was looked at.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute
from service_helpers import RunningServer, publish_model, running_server, solid_png

from service.auth import KeyFirstRoute
from service.keys import SCOPES, KeyConfigError, parse_key
from service.routes import flagged, ops, score
from service.settings import Settings

KEYS = {
    "score": "score-key-7f3a",
    "review": "review-key-91c2",
    "admin": "admin-key-2b8e",
    "all": "every-scope-key-55d0",
}
ENTRIES = [f"score:{KEYS['score']}", f"review:{KEYS['review']}", f"admin:{KEYS['admin']}", KEYS["all"]]
PNG = {"content": solid_png(20), "headers": {"Content-Type": "image/png"}}
BRIGHT = {"content": solid_png(250), "headers": {"Content-Type": "image/png"}}  # an edge case: flagged


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("scopes")
    publish_model(root / "models", "bright", 1)
    with running_server(root / "models", {"api_keys": ENTRIES}, log_dir=root) as running:
        yield running


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


def flag_one(server: RunningServer) -> int:
    response = httpx.post(
        f"{server.url}/score",
        headers={**auth("score"), **BRIGHT["headers"]},
        content=BRIGHT["content"],
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return int(response.json()["results"][0]["flagged_id"])


ROUTES = {
    "score": ("POST", "/score", PNG),
    "list": ("GET", "/flagged", {}),
    "review": ("POST", "/flagged/{id}/review", {"json": {"label": "normal"}}),
    "reload": ("POST", "/admin/reload", {}),
}
ALLOWED = {"score": {"score"}, "review": {"list", "review"}, "admin": {"reload"}, "all": set(ROUTES)}


@pytest.mark.parametrize("who", list(KEYS))
def test_each_key_opens_exactly_the_routes_of_its_scopes(server: RunningServer, who: str) -> None:
    flag_id = flag_one(server)
    with server.client(headers=auth(who)) as client:
        for route, (method, path, kwargs) in ROUTES.items():
            response = client.request(method, path.format(id=flag_id), **kwargs)
            expected = 200 if route in ALLOWED[who] else 403
            assert response.status_code == expected, (who, route, response.text)
            if expected == 403:
                assert response.json()["error"] == "forbidden"
                assert "scope" in response.json()["detail"] and KEYS[who] not in response.json()["detail"]


def test_a_scoring_key_cannot_relabel_a_flag(server: RunningServer) -> None:
    flag_id = flag_one(server)
    with server.client() as client:
        relabel = client.post(f"/flagged/{flag_id}/review", json={"label": "normal"}, headers=auth("score"))
        assert relabel.status_code == 403
        listed = client.get("/flagged", params={"review": "normal"}, headers=auth("review")).json()
        assert flag_id not in [item["id"] for item in listed["items"]]


def post_headers_only(server: RunningServer, path: str, key: str | None) -> tuple[int, float]:
    """Announce a 512 KiB JSON body (within every route's body limit, so the size check does not answer
    first), send a few bytes of it, and wait for the answer: a server that reads the body before the
    key would wait for the rest (and time out here)."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{server.port}",
        "Content-Type: application/json",
        f"Content-Length: {512 * 1024}",
    ]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + b'{"label": "nor')
        answer = sock.recv(4096)
    return int(answer.split()[1]), time.perf_counter() - started


@pytest.mark.parametrize(
    ("path", "key", "status"),
    [
        ("/flagged/1/review", None, 401),
        ("/flagged/1/review", "not-a-key", 401),
        ("/flagged/1/review", KEYS["score"], 403),
        ("/score", None, 401),
        ("/admin/reload", KEYS["review"], 403),
    ],
)
def test_the_key_is_checked_before_the_body_is_read(
    server: RunningServer, path: str, key: str | None, status: int
) -> None:
    answered, seconds = post_headers_only(server, path, key)
    assert answered == status
    assert seconds < 10
    with server.client(headers=auth("all")) as client:  # and the server carries on as normal
        assert client.post("/score", **PNG).status_code == 200


def test_every_route_that_needs_a_key_checks_it_before_reading_a_body() -> None:
    routes = [r for router in (ops.router, score.router, flagged.router) for r in router.routes]
    scoped = [
        r
        for r in routes
        if isinstance(r, APIRoute)
        and any(hasattr(d.call, "required_scope") for d in r.dependant.dependencies)
    ]
    assert {r.path for r in scoped} == {
        "/score",
        "/flagged",
        "/flagged/{flag_id}/image",
        "/flagged/{flag_id}/review",
        "/admin/reload",
    }
    for route in scoped:
        # FastAPI reads a declared body before solving dependencies: such routes need KeyFirstRoute.
        assert route.body_field is None or isinstance(route, KeyFirstRoute), route.path
    assert any(route.body_field is not None for route in scoped)  # the review route: the rule has teeth


def test_keys_from_a_file_work_and_stay_out_of_the_command_line_and_environment(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1)
    token = "file-key-4c7e9a0b"
    key_file = tmp_path / "keys"
    key_file.write_text(f"# fleet uploaders\nscore:{token}\n\n")
    settings = {"api_keys_file": key_file}
    with running_server(repo, settings, via_cli=True, log_dir=tmp_path) as server, server.client() as client:
        assert client.post("/score", **PNG).status_code == 401
        assert (
            client.post(
                "/score",
                headers={"Authorization": f"Bearer {token}", **PNG["headers"]},
                content=PNG["content"],
            ).status_code
            == 200
        )
        proc = Path(f"/proc/{server.process.pid}")
        assert token not in (proc / "cmdline").read_text(errors="replace")
        assert token not in (proc / "environ").read_text(errors="replace")
        assert token not in server.log()
    # What `edgecase serve` exports for its worker processes names the file, not the keys.
    assert token not in str(Settings(api_keys_file=key_file).to_env())


@pytest.mark.parametrize(
    ("entry", "scopes"),
    [
        ("plain-token", set(SCOPES)),
        ("score:t0k3n", {"score"}),
        ("review+admin:t0k3n", {"review", "admin"}),
        ("score:abc+/=", {"score"}),
    ],
)
def test_the_key_syntax(entry: str, scopes: set[str]) -> None:
    assert set(parse_key(entry).scopes) == scopes


@pytest.mark.parametrize(
    ("entry", "problem"),
    [("score:", "empty"), ("reviewer:t0k3n", "unknown"), ("score:has space", "letters"), ("", "empty")],
)
def test_a_bad_key_entry_is_refused_with_the_reason(entry: str, problem: str) -> None:
    with pytest.raises(KeyConfigError, match=problem):
        parse_key(entry)
