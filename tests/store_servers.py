"""Real servers for the shared flagged store's tests: PostgreSQL and an S3-compatible object store.

`postgres_server()` runs Debian's PostgreSQL binaries (`apt-get install postgresql`; the directory is
found under /usr/lib/postgresql/<version>/bin, or from `pg_config --bindir`, or on PATH): `initdb`
on a temp dir with trust auth, then `pg_ctl start` on a free loopback port, with its socket in the
data dir. `initdb` refuses to run as root, so as root the commands run as the `postgres` user the
Debian package creates (`runuser -u postgres`), in a temp dir owned by that user.

`moto_s3()` starts moto's standalone server (`moto_server`, from the `moto[server]` dev extra) on a
free loopback port and yields the AWS variables that point s3fs at it (`AWS_ENDPOINT_URL` and dummy
credentials: the standard variables, the same ones a deployment would set for MinIO).

Both stop their server in a `finally`; both skip the test, saying what to install, only when the
binary is not there.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.launch import free_port, wait_until

PG_INSTALL_HINT = (
    "PostgreSQL binaries not found (apt-get install postgresql, as scripts/install-test-tools does)"
)
MOTO_INSTALL_HINT = "moto_server not found (pip install 'moto[server]', in the dev extra)"


def postgres_bindir() -> Path | None:
    """Where initdb/pg_ctl live: the newest /usr/lib/postgresql/<v>/bin, pg_config's, or PATH's."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]), reverse=True
    )
    if candidates:
        return Path(candidates[0]).parent
    if shutil.which("pg_config"):
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
        if (Path(bindir) / "initdb").is_file():
            return Path(bindir)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_postgres_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres_server(timeout: float = 60.0) -> Iterator[str]:
    """A fresh PostgreSQL cluster on 127.0.0.1:<free port>; yields its superuser URL (no password)."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip(PG_INSTALL_HINT)
    root = Path(tempfile.mkdtemp(prefix="edgecase-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip(
                "running as root and there is no postgres user to run initdb as (apt-get install postgresql)"
            )
        os.chown(root, user.pw_uid, user.pw_gid)
    port = free_port()
    log = root / "postgres.log"
    try:
        subprocess.run(
            _as_postgres_user(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c max_connections=200"
        subprocess.run(
            _as_postgres_user(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(log),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    str(int(timeout)),
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=timeout + 10,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = log.read_text(errors="replace") if log.exists() else ""
        output = getattr(exc, "stderr", b"") or b""
        _stop_postgres(bindir, data)
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(
            f"PostgreSQL did not start: {exc}\n{output.decode(errors='replace')}\n{detail}"
        ) from exc
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        _stop_postgres(bindir, data)
        shutil.rmtree(root, ignore_errors=True)


def _stop_postgres(bindir: Path, data: Path) -> None:
    if (data / "postmaster.pid").exists():
        subprocess.run(
            _as_postgres_user(
                [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop"]
            ),
            capture_output=True,
            timeout=60,
        )


def fresh_database(server_url: str) -> str:
    """Create an empty database on the server; returns its URL (one per test keeps tests apart)."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def moto_server_binary() -> str | None:
    beside = Path(sys.executable).parent / "moto_server"
    return str(beside) if beside.is_file() else shutil.which("moto_server")


@contextlib.contextmanager
def moto_s3(timeout: float = 60.0) -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1:<free port>; yields the AWS_* variables that reach it."""
    binary = moto_server_binary()
    if binary is None:
        pytest.skip(MOTO_INSTALL_HINT)
    port = free_port()
    logdir = Path(tempfile.mkdtemp(prefix="edgecase-moto-"))
    log_path = logdir / "moto.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url, timeout=2.0).status_code < 500
        except httpx.HTTPError:
            return False

    try:
        if not wait_until(lambda: up() or process.poll() is not None, timeout) or process.poll() is not None:
            raise RuntimeError(f"moto_server did not start:\n{log_path.read_text(errors='replace')}")
        yield {
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)
        shutil.rmtree(logdir, ignore_errors=True)


def make_bucket(env: dict[str, str], name: str | None = None) -> str:
    """Create a bucket on the moto server; returns its name."""
    import s3fs

    name = name or f"edgecase-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]},
        skip_instance_cache=True,
    )
    fs.mkdir(name)
    deadline = time.monotonic() + 10
    while not fs.exists(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    return name
