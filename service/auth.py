"""Bearer-token API keys with scopes, checked before a request body is read.

With no keys configured the service is open, which `service.keys.check_exposure` allows only on a
loopback address (or with --insecure). With keys, a protected route needs `Authorization: Bearer
<key>` (401 otherwise) and a key holding the route's scope (403 otherwise): `score` for POST /score,
`review` for the /flagged routes, `admin` for POST /admin/reload. Keys are compared in constant time.
Health, readiness and metrics stay open so probes and Prometheus need no secret.

Why a route class as well as a dependency: FastAPI reads and parses a route's body *before* it solves
any dependency, so on a route with a body parameter (POST /flagged/{id}/review) a key dependency alone
would let a client without a key make the service read the whole body first. `KeyFirstRoute` runs the
same check before the handler touches the body; the dependency stays for every other route and for
the OpenAPI spec (security scheme, 401/403 responses).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ForbiddenError, UnauthorizedError
from service.keys import ApiKey, Scope

# auto_error=False: a missing header is ours to answer (401 with ErrorBody), not FastAPI's 403.
bearer = HTTPBearer(auto_error=False, description="an API key from EDGECASE_API_KEYS(_FILE)")


def _find(token: str, keys: tuple[ApiKey, ...]) -> ApiKey | None:
    found = None
    for key in keys:  # no early exit: the time taken does not say which key was close
        if hmac.compare_digest(token.encode(), key.token.encode()) and found is None:
            found = key
    return found


def check_key(request: Request, token: str | None, scope: Scope) -> None:
    """Pass when keys are off, or the token is a key holding `scope`; else 401 (no/bad key) or 403."""
    keys: tuple[ApiKey, ...] = getattr(request.app.state, "api_keys", ())
    if not keys:
        return
    if token is None:
        raise UnauthorizedError("missing API key: send 'Authorization: Bearer <key>'")
    key = _find(token, keys)
    if key is None:
        raise UnauthorizedError("invalid API key")
    if scope not in key.scopes:
        raise ForbiddenError(f"this API key lacks the {scope!r} scope needed here (it has {key.describe()})")


def _bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


RequireScope = Callable[..., Coroutine[Any, Any, None]]


def require(scope: Scope) -> RequireScope:
    """A dependency that lets a request through only with a key holding `scope` (see module docstring)."""

    async def dependency(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> None:
        check_key(request, credentials.credentials if credentials else None, scope)

    dependency.__name__ = f"require_{scope}"
    dependency.required_scope = scope  # type: ignore[attr-defined]  # read by KeyFirstRoute
    return dependency


require_score = require("score")
require_review = require("review")
require_admin = require("admin")


class KeyFirstRoute(APIRoute):
    """An APIRoute whose key check runs before FastAPI reads the body (see the module docstring)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        scopes: list[Scope] = [
            scope
            for dep in self.dependant.dependencies
            if (scope := getattr(dep.call, "required_scope", None)) is not None
        ]
        if self.body_field is None or not scopes:
            return handler  # no body to protect: the dependency alone runs first

        async def check_then_handle(request: Request) -> Response:
            token = _bearer_token(request)
            for scope in scopes:
                check_key(request, token, scope)
            return await handler(request)

        return check_then_handle
