"""Tools for the hostile-input suite (tests/service/test_attack_*.py): what an attacker's client does,
and how a test sees what it cost the server.

A raw-socket client (`send_streaming`) because the attacks are about what happens *while* a body is
sent: httpx would buffer, retry or hide a connection the server closed. Memory is the server
process's own high-water mark (`VmHWM` in /proc/<pid>/status), read before and after an attack.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import RunningServer, solid_png

MB = 1024 * 1024


def memory_kb(pid: int, field_name: str = "VmHWM") -> int:
    """A /proc/<pid>/status memory field in kB (VmHWM: peak resident set; VmRSS: now)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field_name} not in /proc/{pid}/status")


@contextlib.contextmanager
def peak_growth(server: RunningServer) -> Iterator[list[float]]:
    """Yields a list that holds, after the block, how many MB the server's peak RSS grew during it."""
    before = memory_kb(server.process.pid)
    grown: list[float] = []
    yield grown
    grown.append((memory_kb(server.process.pid) - before) / 1024)


def multipart(parts: Iterable[tuple[str, bytes, str]], boundary: str | None = None) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data body of `files` parts (filename, data, type)."""
    boundary = boundary or uuid.uuid4().hex
    chunks = []
    for filename, data, content_type in parts:
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n".encode()
        )
        chunks.append(data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


@dataclass
class RawResponse:
    status: int | None  # None: the server closed without answering
    head: str
    body: bytes
    sent: int  # body bytes the client managed to send before it stopped
    seconds: float
    closed_early: bool = False  # the connection failed while the body was still being sent


def send_streaming(
    port: int,
    head: str,
    chunks: Iterable[bytes],
    *,
    timeout: float = 30.0,
    stop_after_response: bool = True,
    close_after_body: bool = False,
) -> RawResponse:
    """Send `head` then the body chunk by chunk, stopping as soon as the server answers; read the answer.

    This is what a client pushing a large body sees: an early answer (413, 401) arrives while it still
    has most of its body to send. `close_after_body` hangs up right after the last chunk (a disconnect).
    """
    started = time.monotonic()
    sent = 0
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(head.encode())
        closed_early = False
        for chunk in chunks:
            if stop_after_response and select.select([sock], [], [], 0)[0]:
                break  # an answer (or a close) is waiting: stop sending
            try:
                sock.sendall(chunk)
            except OSError:
                closed_early = True
                break
            sent += len(chunk)
            if time.monotonic() - started > timeout:
                break
        if close_after_body:
            sock.close()
            return RawResponse(None, "", b"", sent, time.monotonic() - started)
        data = _read_response(sock, started + timeout)
    finally:
        sock.close()
    head_text, _, body = data.partition(b"\r\n\r\n")
    status = int(head_text.split()[1]) if head_text.startswith(b"HTTP/1.1") else None
    return RawResponse(
        status, head_text.decode("latin-1"), body, sent, time.monotonic() - started, closed_early
    )


def _read_response(sock: socket.socket, deadline: float) -> bytes:
    """Everything up to the end of one response (Content-Length) or until the server closes."""
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                None,
            )
            if length is not None and len(body) >= length:
                break
    return data


def request_head(method: str, path: str, headers: dict[str, str], port: int) -> str:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return "\r\n".join(lines) + "\r\n\r\n"


def chunked(data_chunks: Iterable[bytes]) -> Iterator[bytes]:
    """HTTP/1.1 chunked transfer encoding of the pieces (no Content-Length: a streaming body)."""
    for piece in data_chunks:
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def status_counts(server: RunningServer) -> dict[tuple[str, str], float]:
    """edgecase_http_requests_total from /metrics: (route, status) -> count."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "edgecase_http_requests_total":
                key = (sample.labels["route"], sample.labels["status"])
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def server_errors(server: RunningServer) -> dict[tuple[str, str], float]:
    """5xx counted by the server, except /readyz's 503 while it warmed up (what the start helper polls)."""
    return {k: v for k, v in status_counts(server).items() if k[1].startswith("5") and k[0] != "/readyz"}


def assert_serves_normally(server: RunningServer, key: str | None = None) -> None:
    """The next ordinary request is answered as before: a dark frame scores low, a 200."""
    headers = {"Content-Type": "image/png"} | ({"Authorization": f"Bearer {key}"} if key else {})
    response = httpx.post(f"{server.url}/score", content=solid_png(20), headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["score"] < 0.2
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200


# --- a burst of concurrent clients, as raw asyncio connections (light enough to run beside the server)


@dataclass
class Burst:
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: dict[int, list[float]] = field(default_factory=dict)
    errors: int = 0

    def record(self, status: int, seconds: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.latencies.setdefault(status, []).append(seconds)


async def _one_client(port: int, request: bytes, until: float, burst: Burst) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while time.monotonic() < until:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert reader is not None
            started = time.monotonic()
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            close = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                elif name.strip().lower() == b"connection" and b"close" in value.lower():
                    close = True
            await reader.readexactly(length)
            burst.record(int(head.split()[1]), time.monotonic() - started)
            if close:
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            burst.errors += 1
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


def run_burst(port: int, request: bytes, clients: int, seconds: float) -> Burst:
    """`clients` connections each sending `request` again and again (closed loop) for `seconds`."""
    burst = Burst()

    async def main() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(_one_client(port, request, until, burst) for _ in range(clients)))

    asyncio.run(main())
    return burst


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")
