"""Attack: a slow (or stalled) upload that holds a connection and a request slot open forever.

Before, nothing bounded how long a body may take: a client could send half a body and wait, and the
request stayed in flight. Now the whole body must arrive within `body_timeout_s` (408).
"""

from __future__ import annotations

import time
from pathlib import Path

from attack_helpers import assert_serves_normally, request_head, send_streaming, server_errors
from service_helpers import publish_model, running_server, solid_png


def trickle(data: bytes, pieces: int, every_s: float):  # type: ignore[no-untyped-def]
    step = max(1, len(data) // pieces)
    for start in range(0, len(data), step):
        yield data[start : start + step]
        time.sleep(every_s)


def test_a_stalled_or_trickling_upload_times_out_with_408(tmp_path: Path) -> None:
    publish_model(tmp_path / "models", "bright", 1)
    png = solid_png(20, size=64)
    with running_server(tmp_path / "models", {"body_timeout_s": 1.5}, log_dir=tmp_path) as server:
        headers = {"Content-Type": "image/png", "Content-Length": str(len(png))}
        head = request_head("POST", "/score", headers, server.port)
        # Half the body, then silence.
        stalled = send_streaming(server.port, head, [png[: len(png) // 2]], timeout=20)
        assert stalled.status == 408, stalled.head
        assert b'"request_timeout"' in stalled.body
        assert stalled.seconds < 10
        # A steady trickle that would take 6 s in all is cut off at the deadline too.
        trickled = send_streaming(server.port, head, trickle(png, 20, 0.3), timeout=20)
        assert trickled.status == 408, trickled.head
        assert not server_errors(server), server_errors(server)
        assert_serves_normally(server)
