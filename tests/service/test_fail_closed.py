"""Fail closed: `edgecase serve` on a non-loopback address without API keys refuses to start (and says
how to fix it) unless --insecure is given; a key setting that is present but empty is an error, not
"open". Before this, the image's 0.0.0.0 default served without keys, and EDGECASE_API_KEYS="" ran
open without a word in the log.

The non-loopback address used is 192.0.2.1 (TEST-NET-1, RFC 5737): no test here can open a port that
other machines reach; where the check passes, binding it fails, which is what shows the check passed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from service_helpers import REPO_ROOT, free_port, publish_model, server_env

from service.keys import check_exposure, is_loopback, load_keys
from service.settings import Settings

NOT_LOOPBACK = "192.0.2.1"


def serve(repo: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `edgecase serve` and wait for it to exit (at most 60 s: a server that starts is killed and
    reported as such, which is the failure these tests look for)."""
    cmd = [sys.executable, "-m", "edgecase.cli", "serve", "--repo", str(repo), "--port", str(free_port())]
    process = subprocess.Popen(
        [*cmd, *args],
        cwd=REPO_ROOT,
        env=env or server_env(repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate(timeout=15)
        pytest.fail(f"`edgecase serve {' '.join(args)}` started instead of refusing:\n{output}")
    return subprocess.CompletedProcess(process.args, process.returncode, output, None)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    publish_model(tmp_path / "models", "bright", 1)
    return tmp_path / "models"


def test_a_network_address_without_keys_refuses_to_start_and_says_how_to_fix_it(repo: Path) -> None:
    result = serve(repo, "--host", NOT_LOOPBACK)
    assert result.returncode == 2, result.stdout
    assert f"refusing to serve on {NOT_LOOPBACK} without API keys" in result.stdout
    assert "--insecure" in result.stdout and "EDGECASE_API_KEYS_FILE" in result.stdout


def test_insecure_lets_it_start_open_on_purpose_and_it_says_so(repo: Path) -> None:
    result = serve(repo, "--host", NOT_LOOPBACK, "--insecure")
    assert "refusing to serve" not in result.stdout
    # It went past the check: the app started up, warned that it is open, then could not bind.
    assert f"anyone who can reach {NOT_LOOPBACK} may score and relabel" in result.stdout, result.stdout
    assert result.returncode != 0


def test_keys_set_but_empty_are_an_error_not_an_open_service(repo: Path) -> None:
    result = serve(repo, env=server_env(repo, {"api_keys": ""}))
    assert result.returncode == 2, result.stdout
    assert "EDGECASE_API_KEYS is set but holds no key" in result.stdout


def test_an_empty_key_file_is_an_error_not_an_open_service(repo: Path, tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("# nobody yet\n\n")
    result = serve(repo, "--api-keys-file", str(tmp_path / "keys"))
    assert result.returncode == 2, result.stdout
    assert "has no keys" in result.stdout


def test_the_rule_itself(tmp_path: Path) -> None:
    assert all(is_loopback(h) for h in ["127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"])
    assert not any(is_loopback(h) for h in ["0.0.0.0", "::", "10.0.0.5", "edgecase.internal", ""])
    open_on_network = Settings(host="0.0.0.0")
    with pytest.raises(ValueError, match="--insecure"):
        check_exposure(open_on_network, load_keys(open_on_network))
    check_exposure(Settings(host="0.0.0.0", insecure=True), ())
    keyed = Settings(host="0.0.0.0", api_keys=["score:abc"])
    check_exposure(keyed, load_keys(keyed))
    (tmp_path / "k").write_text("admin:abc\n")
    with pytest.raises(ValidationError, match="not both"):
        Settings(api_keys=["x"], api_keys_file=tmp_path / "k")
    with pytest.raises(ValidationError, match="cannot read"):
        Settings(api_keys_file=tmp_path / "missing")
