"""`edgecase serve`: run the scoring service (FastAPI + onnxruntime) under uvicorn.

Flags become `EDGECASE_*` environment variables before uvicorn starts, because with several workers
each process builds its own app from the environment (`service.app:create_app` is a factory). With
more than one worker, Prometheus multiprocess mode is switched on: a fresh `PROMETHEUS_MULTIPROC_DIR`
(emptied at start) where every worker writes its metrics, so `/metrics` is the same from any worker.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from edgecase.commands import add_command

EXAMPLE = (
    "edgecase serve --repo models/ --port 8000 --workers 2   # then: curl localhost:8000/models\n"
    "  edgecase serve --host 0.0.0.0 --api-keys-file /run/secrets/edgecase-keys   # on a network"
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(sub, "serve", "serve models over HTTP: POST /score, /metrics, /models", EXAMPLE)
    parser.add_argument(
        "--repo", type=Path, help="model repository <repo>/<name>/<version>/ (default models)"
    )
    parser.add_argument("--host", help="interface to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, help="TCP port (default 8000)")
    parser.add_argument("--workers", type=int, help="worker processes (default 1)")
    parser.add_argument("--http", choices=["auto", "h11", "httptools"], help="HTTP parser (default auto)")
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], help="event loop (default auto)")
    parser.add_argument("--model", dest="default_model", help="model served without ?model= (default: first)")
    parser.add_argument("--max-batch-size", type=int, help="most frames per session.run (default 32)")
    parser.add_argument("--max-queue-delay-ms", type=float, help="longest wait to fill a batch (default 2)")
    parser.add_argument(
        "--max-queue-frames", type=int, help="queued frames per model before 429 (default 1024)"
    )
    parser.add_argument("--flagged-dir", type=Path, help="flagged-frame store folder (default flagged)")
    parser.add_argument("--reload-poll-s", type=float, help="seconds between repo polls, 0 = off (default 5)")
    parser.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        help="API key: `token` (all scopes) or `score:token`, `review+admin:token`... (repeatable; "
        "visible in ps: prefer --api-keys-file)",
    )
    parser.add_argument(
        "--api-keys-file", type=Path, help="file with one key entry per line, # comments (docs/security.md)"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback --host without API keys (without it, that refuses to start)",
    )
    parser.add_argument(
        "--providers", help="onnxruntime providers, comma-separated (default: CUDA if any, CPU)"
    )
    parser.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="text, or one JSON object per line with request_id, model, version (default text)",
    )
    parser.set_defaults(handler=run)


# Flags that map one-to-one onto Settings fields (argparse dest == field name).
_SETTING_FLAGS = (
    "repo",
    "host",
    "port",
    "workers",
    "http",
    "loop",
    "default_model",
    "max_batch_size",
    "max_queue_delay_ms",
    "max_queue_frames",
    "flagged_dir",
    "reload_poll_s",
    "api_keys",
    "api_keys_file",
    "insecure",
    "providers",
    "log_level",
    "log_format",
)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from edgecase.cli import CliError

    overrides = {
        name: getattr(args, name) for name in _SETTING_FLAGS if getattr(args, name, None) is not None
    }
    if isinstance(overrides.get("providers"), str):
        overrides["providers"] = [p.strip() for p in overrides["providers"].split(",") if p.strip()]
    try:
        from service.settings import Settings

        # Env first, flags on top; then written back to env so every worker sees the same settings.
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise CliError(f"invalid settings: {problems}") from exc
    except ModuleNotFoundError as exc:
        raise CliError(f"the service is not installed ({exc.name}); pip install -e '.[serve,cpu]'") from exc
    if not settings.repo.is_dir():
        raise CliError(f"model repository {settings.repo} does not exist (export a model first)")
    from service.keys import KeyConfigError, check_exposure, load_keys

    try:
        check_exposure(settings, load_keys(settings))  # fail closed before any worker starts
    except KeyConfigError as exc:
        raise CliError(str(exc)) from exc
    os.environ.update(settings.to_env())
    if settings.workers > 1:
        _enable_multiprocess_metrics()

    import uvicorn

    from service.logs import logging_config

    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        http=settings.http,
        loop=settings.loop,
        log_level=settings.log_level,
        # Applied in every worker: uvicorn's own lines in our format; our middleware writes the
        # access log (with the request id and duration), so uvicorn's is off.
        log_config=logging_config(settings.log_format, settings.log_level),
        access_log=False,
    )
    return 0


def _enable_multiprocess_metrics() -> None:
    """Point prometheus_client at an empty shared folder before any worker imports it."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    path = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="edgecase-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):  # counters from an earlier run must not add up with ours
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
