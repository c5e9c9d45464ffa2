"""Attack (or a flaky uplink): clients that hang up in the middle of their upload.

Before, the disconnect surfaced as an unhandled error: logged with a traceback and counted as a 500,
which is what the high-5xx alert watches, so a few dropped uploads could page someone. Now it is
logged at info as a disconnect and counted as 499 (client closed request).
"""

from __future__ import annotations

from pathlib import Path

from attack_helpers import (
    assert_serves_normally,
    multipart,
    peak_growth,
    request_head,
    send_streaming,
    server_errors,
    status_counts,
)
from service_helpers import publish_model, running_server, solid_png, wait_until


def test_clients_that_disconnect_mid_upload_are_not_server_errors(tmp_path: Path) -> None:
    publish_model(tmp_path / "models", "bright", 1)
    body, content_type = multipart((f"{i}.png", solid_png(i, size=64), "image/png") for i in range(32))
    with running_server(tmp_path / "models", {"log_level": "info"}, log_dir=tmp_path) as server:
        with peak_growth(server) as grown:
            for path, kind in [
                ("/score", content_type),
                ("/score", "application/json"),
                ("/flagged/1/review", "application/json"),
            ]:
                for _ in range(3):
                    headers = {"Content-Type": kind, "Content-Length": str(len(body))}
                    head = request_head("POST", path, headers, server.port)
                    send_streaming(server.port, head, [body[: len(body) // 2]], close_after_body=True)

        def counted() -> bool:
            return sum(v for (_, status), v in status_counts(server).items() if status == "499") >= 9

        assert wait_until(counted, 20), status_counts(server)
        assert not server_errors(server), server_errors(server)
        log = server.log()
        assert "client disconnected" in log, log[-2000:]
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-4000:]
        assert grown[0] < 50, f"server peak RSS grew by {grown[0]:.0f} MB"
        assert_serves_normally(server)
