"""Starting a server process and knowing when it serves: shared by `edgecase demo`, the service
benchmark and the tests, which all run `edgecase serve` (or uvicorn) as a subprocess on loopback.

Only the standard library and httpx: importing this does not import FastAPI or onnxruntime.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def responds(url: str, path: str = "/readyz", timeout: float = 2.0) -> bool:
    """True when ``GET url+path`` answers 200 (``/readyz``: models loaded and warmed up)."""
    try:
        return httpx.get(f"{url}{path}", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_serving(
    url: str, process: subprocess.Popen[bytes], timeout: float = 120.0, path: str = "/readyz"
) -> bool:
    """Wait until the server at ``url`` answers ``path`` with 200; False if it exits or times out first."""
    wait_until(lambda: process.poll() is not None or responds(url, path), timeout, interval=0.1)
    return process.poll() is None and responds(url, path)
