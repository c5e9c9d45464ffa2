"""The service's one settings object, read from `EDGECASE_*` environment variables.

`edgecase serve` turns its flags into these variables before starting uvicorn, so worker processes
(which import the app afresh) see the same values. `get_settings()` is the only cached global; the app
factory takes a `Settings` explicitly so tests never depend on the environment.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.keys import parse_keys, read_key_file

ENV_PREFIX = "EDGECASE_"
MIN_IMAGE_CAP = 16 * 1024


def _split_list(value: Any) -> Any:
    """Accept a JSON list or a comma-separated string for list settings (`a,b` is friendlier in a shell)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every knob of the scoring service; defaults suit one CPU machine."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    repo: Path = Field(Path("models"), description="model repository: <repo>/<name>/<version>/")
    default_model: str | None = Field(None, description="model served when ?model= is absent; None = first")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, description="uvicorn worker processes")
    http: Literal["auto", "h11", "httptools"] = Field(
        "auto", description="uvicorn HTTP parser; auto = httptools when installed (the serve extra has it)"
    )
    loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto", description="event loop; auto = uvloop when installed (the serve extra has it on Linux/macOS)"
    )

    # Dynamic batching, as in Triton's dynamic batcher (max batch size, max queue delay).
    max_batch_size: int = Field(32, ge=1, description="most frames in one session.run")
    max_queue_delay_ms: float = Field(2.0, ge=0.0, description="longest wait for a batch to fill up")
    max_queue_frames: int = Field(1024, ge=1, description="frames waiting per model version before 429")
    eager_dispatch: bool = Field(
        True, description="skip the delay when no other request is on its way (False = Triton's rule)"
    )
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime threads per session; 0 = one per core")

    # Limits on what a client may send (decompression bombs, memory): docs/security.md, "Limits".
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1, description="POST /score body, while streaming")
    max_other_body_bytes: int = Field(
        1024 * 1024, ge=1, description="body of every other route (flag reviews, admin), while streaming"
    )
    json_bytes_per_frame: int = Field(
        256 * 1024,
        ge=1024,
        description="a JSON /score body may hold max_frames_per_request times this (base64 frames)",
    )
    max_frames_per_request: int = Field(256, ge=1)
    max_pixels_per_frame: int = Field(16_000_000, ge=1)
    max_pixels_per_request: int = Field(
        128_000_000,
        ge=1,
        description="decoded pixels per request (JPEG draft counted), checked from the headers before any "
        "decode; 128 Mpx is 384 MB as RGB, although frames are decoded and resized one at a time",
    )
    decode_threads: int = Field(
        default_factory=lambda: min(4, os.cpu_count() or 1),
        ge=1,
        description="threads decoding frames; each holds one full-size frame at a time",
    )
    body_timeout_s: float = Field(
        30.0, gt=0.0, description="a request body must arrive within this many seconds of the request (408)"
    )
    max_requests_in_flight: int = Field(
        32,
        ge=1,
        description="POST /score requests admitted at once per worker (32 x 32 frames = the default queue, "
        "which then never overflows); more wait, then 429",
    )
    admission_wait_s: float = Field(
        1.0, ge=0.0, description="longest wait for admission, in arrival order, before a 429 (body unread)"
    )
    max_requests_waiting: int = Field(
        1024, ge=0, description="requests waiting for admission per worker; more answer 429 at once"
    )
    max_body_bytes_in_flight: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="sum of the admitted /score bodies' sizes per worker (a chunked body counts as "
        "max_body_bytes); a request that would pass it answers 429, unless nothing else is in flight",
    )
    request_deadline_s: float = Field(
        30.0, gt=0.0, description="an admitted request's decode + queue + inference must end by then (503)"
    )

    # Access and self-repair (issue 14). Key syntax and scopes: service/auth.py, docs/security.md.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="bearer tokens, each `token` (every scope) or `scope+scope:token` with scopes score, "
        "review, admin; unset = open (loopback only, see insecure); set but empty is an error",
    )
    api_keys_file: Path | None = Field(
        None, description="file with one key entry per line (# comments), instead of api_keys (not in ps)"
    )
    insecure: bool = Field(
        False, description="allow a non-loopback host without API keys (anyone who can connect may score)"
    )
    batcher_restart_s: float = Field(
        0.5, gt=0.0, description="pause before restarting a batcher whose loop ended; doubles while it recurs"
    )
    batcher_restart_max_s: float = Field(10.0, gt=0.0, description="longest pause between batcher restarts")
    swap_drain_s: float = Field(
        30.0, ge=0.0, description="on a swap, how long the old version waits for requests that resolved it"
    )
    flagged_dir: Path = Field(
        Path("flagged"), description="the embedded flagged store (SQLite + image files), unless flagged_url"
    )
    # The shared flagged store (many replicas, one review queue): rows in PostgreSQL, images in an
    # object store through fsspec. Unset flagged_url = the embedded store in flagged_dir.
    flagged_url: str | None = Field(
        None, description="PostgreSQL URL of the shared flagged store, e.g. postgresql://user:pw@db/edgecase"
    )
    flagged_images: str | None = Field(
        None,
        description="where the shared store keeps images: s3://bucket/prefix/ (fsspec) or a shared folder",
    )
    flagged_images_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options for flagged_images as JSON, e.g. "
        '{"client_kwargs": {"endpoint_url": "http://minio:9000"}}; s3fs also reads the AWS_* variables',
    )
    flagged_pool_size: int = Field(8, ge=1, description="PostgreSQL connections per worker process")
    flagged_max_frames: int = Field(0, ge=0, description="retention: most flags kept (0 = no limit)")
    flagged_max_bytes: int = Field(0, ge=0, description="retention: most image bytes kept (0 = no limit)")
    flagged_max_image_bytes: int = Field(
        4 * 1024 * 1024,
        ge=0,
        description="a flagged frame's bytes are kept as sent up to this size, else the decoded frame is "
        "re-encoded as PNG (shrunk until it fits); 0 = keep originals of any size",
    )
    flagged_retention_poll_s: float = Field(
        60.0, ge=0.0, description="how often retention runs and the store-size gauges update; 0 = never"
    )
    reload_poll_s: float = Field(5.0, ge=0.0, description="poll the repo for new versions; 0 = off")
    providers: Annotated[list[str] | None, NoDecode] = Field(
        None, description="onnxruntime execution providers; None = CUDA when available, else CPU"
    )
    warmup_batch_sizes: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [1], description="batch sizes run once before a version serves"
    )
    startup_wait_s: float = Field(
        10.0,
        ge=0.0,
        description="a scoring request that arrives while this worker is still loading its models at "
        "startup waits this long for them before answering 503 (with several workers, /readyz may be "
        "answered by a worker that is ready while another is still warming up)",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text, or one JSON object per line with the request id"
    )

    @field_validator("providers", "warmup_batch_sizes", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _key_list(cls, value: Any) -> Any:
        # Set-but-empty must not mean "open": a typo or an unset secret would silently drop every key.
        if isinstance(value, str) and not _split_list(value):
            raise ValueError(
                "EDGECASE_API_KEYS is set but holds no key; unset it to run without keys (loopback only), "
                "or give at least one"
            )
        return _split_list(value)

    @field_validator("api_keys", mode="after")
    @classmethod
    def _key_syntax(cls, value: list[str]) -> list[str]:
        parse_keys(value, "EDGECASE_API_KEYS")  # raises KeyConfigError (a ValueError) naming the problem
        return value

    @field_validator("default_model", "flagged_url", "flagged_images", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.api_keys and self.api_keys_file is not None:
            raise ValueError("set EDGECASE_API_KEYS or EDGECASE_API_KEYS_FILE, not both")
        if self.api_keys_file is not None:
            read_key_file(self.api_keys_file)  # unreadable or empty: fail now, not on the first request
        if 0 < self.flagged_max_image_bytes < MIN_IMAGE_CAP:
            raise ValueError(
                f"flagged_max_image_bytes must be 0 (no cap) or at least {MIN_IMAGE_CAP} bytes, got "
                f"{self.flagged_max_image_bytes}: below that not even a thumbnail fits"
            )
        if self.max_queue_frames < self.max_batch_size:
            raise ValueError(
                f"max_queue_frames ({self.max_queue_frames}) must be at least max_batch_size "
                f"({self.max_batch_size}), or a full batch could never be queued"
            )
        return self

    @property
    def max_json_body_bytes(self) -> int:
        """The JSON /score body limit: proportional to the frame limit, never above max_body_bytes."""
        return min(self.max_body_bytes, self.max_frames_per_request * self.json_bytes_per_frame)

    def to_env(self) -> dict[str, str]:
        """These settings as EDGECASE_* variables (what `edgecase serve` exports for its workers)."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None or (name == "api_keys" and not value):  # no keys: unset, never set-but-empty
                continue
            if isinstance(value, dict):
                text = json.dumps(value)
            else:
                text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            env[f"{ENV_PREFIX}{name.upper()}"] = text
        return env


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()
