"""Settings: EDGECASE_* variables, list parsing, consistency checks, and the env round trip of `serve`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_defaults_match_the_documented_batching_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EDGECASE_"):
            monkeypatch.delenv(name)
    settings = Settings()
    assert settings.max_batch_size == 32
    assert settings.max_queue_delay_ms == 2.0
    assert settings.api_keys == []
    assert settings.default_model is None


def test_environment_variables_with_the_prefix_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECASE_REPO", "/srv/models")
    monkeypatch.setenv("EDGECASE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("EDGECASE_API_KEYS", "alpha, beta")
    monkeypatch.setenv("EDGECASE_PROVIDERS", '["CUDAExecutionProvider", "CPUExecutionProvider"]')
    settings = Settings()
    assert settings.repo == Path("/srv/models")
    assert settings.max_batch_size == 8
    assert settings.api_keys == ["alpha", "beta"]
    assert settings.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_an_empty_default_model_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECASE_DEFAULT_MODEL", "")
    assert Settings().default_model is None


def test_explicit_values_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECASE_PORT", "9000")
    assert Settings(port=1234).port == 1234


def test_a_queue_smaller_than_a_batch_is_refused() -> None:
    with pytest.raises(ValidationError, match="max_queue_frames"):
        Settings(max_batch_size=64, max_queue_frames=8)


def test_to_env_round_trips_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings(
        repo=Path("/m"), api_keys=["k1", "k2"], workers=3, max_queue_delay_ms=0.5, http="h11", loop="asyncio"
    )
    for name, value in original.to_env().items():
        monkeypatch.setenv(name, value)
    assert Settings() == original


def test_an_unknown_http_parser_or_event_loop_is_refused() -> None:
    with pytest.raises(ValidationError, match="http"):
        Settings(http="spdy")
    with pytest.raises(ValidationError, match="loop"):
        Settings(loop="trio")
