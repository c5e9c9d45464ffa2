"""The flagged routes: list with filters and paging, fetch an image, record a review; errors as ErrorBody.

These drive the router in a small app over httpx's ASGI transport (fast, no server); the crash test
(tests/test_service_crash.py) drives the same routes on a real uvicorn server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from service_helpers import publish_model, running_server, solid_png

from service.errors import install_error_handlers
from service.flagged import FlaggedStore
from service.routes.flagged import router


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FlaggedStore]:
    with FlaggedStore(tmp_path / "flagged") as opened:
        yield opened


@pytest.fixture
def app(store: FlaggedStore) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.store = store
    return app


def call(app: FastAPI, method: str, url: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, url, **kwargs)

    return asyncio.run(go())


def flag(store: FlaggedStore, value: int, **fields: Any) -> int:
    defaults: dict[str, Any] = {"model": "bright", "version": 1, "score": value / 255, "p_value": 0.05}
    return store.add(solid_png(value), **{**defaults, **fields}).id


def test_list_returns_items_and_total_newest_first(app: FastAPI, store: FlaggedStore) -> None:
    ids = [flag(store, 200 + i, key=f"cam/{i}", metadata={"i": i}) for i in range(3)]
    body = call(app, "GET", "/flagged").json()
    assert body["total"] == 3 and body["limit"] == 50 and body["offset"] == 0
    assert [item["id"] for item in body["items"]] == ids[::-1]
    item = body["items"][-1]
    assert item["key"] == "cam/0" and item["metadata"] == {"i": 0} and item["review"] == "unreviewed"
    assert item["model"] == "bright" and item["version"] == 1 and item["media_type"] == "image/png"
    assert item["image_url"] == f"/flagged/{ids[0]}/image"
    assert item["created_at"].endswith(("Z", "+00:00"))


def test_list_filters_and_pages(app: FastAPI, store: FlaggedStore) -> None:
    for i in range(5):
        flag(store, 150 + i, model="a" if i < 3 else "b", version=1 + i % 2)
    assert call(app, "GET", "/flagged", params={"model": "a"}).json()["total"] == 3
    assert call(app, "GET", "/flagged", params={"model": "a", "version": 2}).json()["total"] == 1
    page = call(app, "GET", "/flagged", params={"limit": 2, "offset": 4}).json()
    assert page["total"] == 5 and len(page["items"]) == 1
    future = call(app, "GET", "/flagged", params={"since": "2999-01-01T00:00:00Z"}).json()
    assert future["total"] == 0
    assert call(app, "GET", "/flagged", params={"until": "2999-01-01T00:00:00"}).json()["total"] == 5


def test_image_route_returns_the_stored_bytes_with_their_media_type(
    app: FastAPI, store: FlaggedStore
) -> None:
    png_id = flag(store, 220)
    jpeg_id = store.add(solid_png(230, fmt="JPEG"), model="m", version=1, score=1, p_value=0.1, ext="jpg").id
    response = call(app, "GET", f"/flagged/{png_id}/image")
    assert response.status_code == 200 and response.content == solid_png(220)
    assert response.headers["content-type"] == "image/png"
    assert call(app, "GET", f"/flagged/{jpeg_id}/image").headers["content-type"] == "image/jpeg"


def test_review_records_the_label_and_filters_by_it(app: FastAPI, store: FlaggedStore) -> None:
    first, second = flag(store, 200), flag(store, 210)
    response = call(app, "POST", f"/flagged/{first}/review", json={"label": "normal"})
    assert response.status_code == 200
    assert response.json()["review"] == "normal" and response.json()["reviewed_at"] is not None
    call(app, "POST", f"/flagged/{second}/review", json={"label": "edge_case"})
    assert [i["id"] for i in call(app, "GET", "/flagged", params={"review": "normal"}).json()["items"]] == [
        first
    ]
    assert call(app, "GET", "/flagged", params={"review": "unreviewed"}).json()["total"] == 0


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "code"),
    [
        ("GET", "/flagged/999/image", {}, 404, "not_found"),
        ("POST", "/flagged/999/review", {"json": {"label": "normal"}}, 404, "not_found"),
        ("POST", "/flagged/1/review", {"json": {"label": "maybe"}}, 422, "invalid_request"),
        ("POST", "/flagged/1/review", {"json": {"label": "normal", "x": 1}}, 422, "invalid_request"),
        ("POST", "/flagged/1/review", {"content": b"not json"}, 422, "invalid_request"),
        ("GET", "/flagged/0/image", {}, 422, "invalid_request"),
        ("GET", f"/flagged/{2**64}/image", {}, 422, "invalid_request"),
        ("GET", "/flagged?review=maybe", {}, 422, "invalid_request"),
        ("GET", "/flagged?limit=0", {}, 422, "invalid_request"),
        ("GET", "/flagged?limit=100000", {}, 422, "invalid_request"),
        ("GET", "/flagged?since=yesterday", {}, 422, "invalid_request"),
        ("GET", "/flagged?until=0.5", {}, 422, "invalid_request"),  # unix seconds: not what the spec says
        ("GET", "/flagged?until=2026-01-31", {}, 422, "invalid_request"),  # a date without a time
    ],
)
def test_bad_requests_get_a_4xx_with_a_reason(
    app: FastAPI, store: FlaggedStore, method: str, url: str, kwargs: dict, status: int, code: str
) -> None:
    flag(store, 200)
    response = call(app, method, url, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"] == code and response.json()["detail"]


def test_without_a_store_the_routes_answer_503(app: FastAPI) -> None:
    app.state.store = None
    response = call(app, "GET", "/flagged")
    assert response.status_code == 503 and response.json()["error"] == "not_ready"


def test_the_openapi_spec_describes_the_routes(app: FastAPI) -> None:
    spec = call(app, "GET", "/openapi.json").json()
    assert set(spec["paths"]) >= {"/flagged", "/flagged/{flag_id}/image", "/flagged/{flag_id}/review"}
    image = spec["paths"]["/flagged/{flag_id}/image"]["get"]
    assert set(image["responses"]["200"]["content"]) == {"image/png", "image/jpeg", "image/webp"}
    review = spec["paths"]["/flagged/{flag_id}/review"]["post"]
    assert review["summary"] and review["responses"]["404"]
    assert spec["components"]["schemas"]["ReviewRequest"]["properties"]["label"]["enum"] == [
        "edge_case",
        "normal",
    ]


def test_on_a_real_server_a_scored_edge_case_is_listed_reviewed_and_needs_the_api_key(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1, size=8, threshold=0.5)
    settings = {"api_keys": ["s3cret"], "default_model": "bright"}
    with running_server(repo, settings, log_dir=tmp_path) as server, server.client() as http:
        auth = {"Authorization": "Bearer s3cret"}
        assert http.get("/flagged").status_code == 401
        assert http.get("/flagged", headers={"Authorization": "Bearer wrong"}).status_code == 401
        files = [
            ("files", ("dark.png", solid_png(10), "image/png")),
            ("files", ("lit.png", solid_png(250), "image/png")),
        ]
        dark, lit = http.post("/score", files=files, headers=auth).json()["results"]
        assert "flagged_id" not in dark and lit["flagged_id"] >= 1
        listing = http.get("/flagged", params={"model": "bright"}, headers=auth).json()
        assert [(item["id"], item["key"]) for item in listing["items"]] == [(lit["flagged_id"], "lit.png")]
        image = http.get(f"/flagged/{lit['flagged_id']}/image", headers=auth)
        assert image.content == solid_png(250) and image.headers["content-type"] == "image/png"
        review = http.post(f"/flagged/{lit['flagged_id']}/review", json={"label": "normal"}, headers=auth)
        assert review.status_code == 200 and review.json()["review"] == "normal"
