"""API keys and their scopes: the syntax of a key entry, reading keys from a file, and the rule that
refuses to serve a non-loopback address without keys. No FastAPI here (settings validate entries).

An entry is `token` or `scopes:token`, scopes joined by `+`:

    score:fleet-uploader-7f3a           POST /score only
    review:labeller-91c2                the /flagged routes (list, image, review)
    admin+review:ops-2b8e               POST /admin/reload and the /flagged routes
    legacy-token                        no prefix: every scope, today's meaning of a key

`:` cannot occur in a bearer token (RFC 6750's b64token has no colon), so the first `:` always ends
the scopes. Keys come from `EDGECASE_API_KEYS` (comma-separated, or `--api-key`, repeatable) or from
`EDGECASE_API_KEYS_FILE` (one entry per line, `#` comments), never both; the file keeps tokens out of
`ps` and out of the environment that `edgecase serve` hands its workers.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

Scope = Literal["score", "review", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)

# RFC 6750 b64token: what a client can put after "Bearer ".
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class KeyConfigError(ValueError):
    """The key settings are unusable (bad entry, empty list, unreadable file, open on a network)."""


@dataclass(frozen=True)
class ApiKey:
    token: str
    scopes: frozenset[Scope]

    def describe(self) -> str:
        """The key's scopes and which key it is, for logs: a hash prefix, never the token itself."""
        digest = hashlib.sha256(self.token.encode()).hexdigest()[:8]
        return f"{'+'.join(s for s in SCOPES if s in self.scopes)} key sha256:{digest}"


class KeySettings(Protocol):
    """The part of `service.settings.Settings` these functions read."""

    @property
    def api_keys(self) -> list[str]: ...
    @property
    def api_keys_file(self) -> Path | None: ...
    @property
    def host(self) -> str: ...
    @property
    def insecure(self) -> bool: ...


def parse_key(entry: str) -> ApiKey:
    """One entry (`token` or `scope+scope:token`) as an ApiKey; KeyConfigError says what is wrong."""
    text = entry.strip()
    prefix, sep, token = text.partition(":")
    if not sep:
        prefix, token = "", text
    if not token:
        raise KeyConfigError("an API key entry is empty")
    if not _TOKEN.fullmatch(token):
        raise KeyConfigError(
            "an API key may use only letters, digits and -._~+/ (then = padding), as a bearer token must"
        )
    if not sep:
        return ApiKey(token, frozenset(SCOPES))
    names = [part.strip() for part in prefix.split("+")]
    unknown = [name for name in names if name not in SCOPES]
    if unknown:
        raise KeyConfigError(f"unknown API key scope(s) {unknown}; scopes are {', '.join(SCOPES)}")
    return ApiKey(token, frozenset(name for name in SCOPES if name in names))


def parse_keys(entries: list[str], source: str) -> tuple[ApiKey, ...]:
    """Every entry parsed; the same token twice is an error (its scopes would be ambiguous)."""
    keys = tuple(parse_key(entry) for entry in entries)
    tokens = [key.token for key in keys]
    if len(set(tokens)) != len(tokens):
        raise KeyConfigError(f"{source} lists the same token more than once")
    return keys


def read_key_file(path: Path) -> list[str]:
    """Entries of a key file: one per line; blank lines and `#` comments skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyConfigError(f"cannot read the API key file {path}: {exc.strerror or exc}") from exc
    entries = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    entries = [entry for entry in entries if entry]
    if not entries:
        raise KeyConfigError(f"the API key file {path} has no keys (an empty key file is not 'open')")
    return entries


def load_keys(settings: KeySettings) -> tuple[ApiKey, ...]:
    """The configured keys (from the file when one is set); () means no keys at all."""
    if settings.api_keys_file is not None:
        return parse_keys(read_key_file(settings.api_keys_file), str(settings.api_keys_file))
    return parse_keys(settings.api_keys, "EDGECASE_API_KEYS")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; any other name or address may be reachable by others."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: KeySettings, keys: tuple[ApiKey, ...]) -> None:
    """Fail closed: no keys on a non-loopback host is refused unless `insecure` says it is on purpose."""
    if keys or settings.insecure or is_loopback(settings.host):
        return
    raise KeyConfigError(
        f"refusing to serve on {settings.host} without API keys: anyone who can reach this address could "
        "score frames and relabel flags. Set EDGECASE_API_KEYS_FILE (or EDGECASE_API_KEYS / --api-key), "
        "or pass --insecure (EDGECASE_INSECURE=1) to serve it open on purpose."
    )
