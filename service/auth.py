"""Optional bearer-token API keys for the scoring, admin and flagged routes.

With no keys configured the service is open (a laptop, a private network). With keys, a request must
send `Authorization: Bearer <key>`; keys are compared in constant time. Health, readiness and metrics
stay open so probes and Prometheus need no secret.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import UnauthorizedError

# auto_error=False: a missing header is ours to answer (401 with ErrorBody), not FastAPI's 403.
bearer = HTTPBearer(auto_error=False, description="an API key from EDGECASE_API_KEYS")


def _matches(token: str, keys: list[str]) -> bool:
    found = False
    for key in keys:  # no early exit: the time taken does not say which key was close
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


async def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """Dependency: pass when keys are off or the bearer token is one of them, else 401."""
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return
    if credentials is None:
        raise UnauthorizedError("missing API key: send 'Authorization: Bearer <key>'")
    if not _matches(credentials.credentials, keys):
        raise UnauthorizedError("invalid API key")
