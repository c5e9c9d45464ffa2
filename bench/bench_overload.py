"""Overload benchmark: far more clients than the service can serve, with its default settings.

For each frames-per-request (1 and 32) and client count (64, 256, 512), wrk drives `POST /score` of a
real `edgecase serve` on loopback with a closed loop (each connection sends its next request when the
last one returns) for `--seconds`. Recorded per point: the responses by status (wrk's Lua `response`
hook), wrk's latency p50/p99 over all responses, frames scored per second (the server's own counter),
the server's peak resident memory (VmRSS of the server's process tree, sampled every 50 ms), /healthz
latency p50/p99 (a probe every 20 ms from this process while the load runs), and, after the point,
whether the server serves normally again (one raw request: status and latency).

What the issue asks of it: only 200 or 429, resident memory under the documented bound
(docs/security.md, "Limits"), /healthz p99 under 100 ms, normal service afterwards.

The model and frames are bench_service.py's (`--repo/--model/--data`; the tiny test graph without).
Server settings are the defaults (admission limit, queue, deadline) unless given as EDGECASE_* in the
environment.

    python bench/bench_overload.py --repo /tmp/bench/models --model vae64-elbo --data /tmp/bench/synth/val
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "bench"), str(REPO_ROOT / "tests")]

from bench_service import (  # noqa: E402 (needs the path above)
    make_frames,
    multipart_body,
    percentile,
    pick_model,
    scored_and_flagged,
    start_server,
    wait_drained,
)

HEALTHZ_P99_TARGET_MS = 100.0

WRK_SCRIPT = """
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
local body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
function init(args)
  statuses = {}
end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local parts = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      parts[#parts + 1] = string.format("\\"%d\\": %d", status, n)
    end
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH_JSON {\\"requests\\": %d, \\"duration_us\\": %d, \\"socket_errors\\": %d, \\"p50_us\\": %d, "
    .. "\\"p99_us\\": %d, \\"statuses\\": [{%s}]}\\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), table.concat(parts, "}, {")))
end
"""


@dataclass
class OverloadPoint:
    frames_per_request: int
    clients: int
    seconds: float
    load_average: float
    statuses: dict[str, int]
    socket_errors: int
    p50_ms: float
    p99_ms: float
    frames_scored_per_s: float
    peak_rss_mb: float
    healthz_p50_ms: float
    healthz_p99_ms: float
    healthz_probes: int
    after_status: int
    after_ms: float
    notes: list[str] = field(default_factory=list)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants (MB), from /proc."""
    total_kb, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total_kb / 1024


class Sampler:
    """Samples peak RSS and /healthz latency in a background thread while a point runs."""

    def __init__(self, url: str, pid: int) -> None:
        self.url, self.pid = url, pid
        self.peak_rss_mb = 0.0
        self.healthz: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._rss), threading.Thread(target=self._health)]

    def __enter__(self) -> Sampler:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _rss(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_rss_mb = max(self.peak_rss_mb, tree_rss_mb(self.pid))

    def _health(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=10.0) as client:
            while not self._stop.wait(0.02):
                started = time.perf_counter()
                try:
                    ok = client.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.healthz.append(time.perf_counter() - started)
                else:
                    self.failures += 1


def run_point(
    url: str,
    pid: int,
    body: tuple[bytes, str],
    frames: int,
    clients: int,
    args: argparse.Namespace,
    workdir: Path,
) -> OverloadPoint:
    script, body_file = workdir / "overload.lua", workdir / f"body-{frames}.bin"
    script.write_text(WRK_SCRIPT)
    body_file.write_bytes(body[0])
    env = dict(os.environ, BENCH_BODY=str(body_file), BENCH_CONTENT_TYPE=body[1])
    wait_drained(url)
    load = os.getloadavg()[0]
    scored_before, _ = scored_and_flagged(url)
    cmd = ["wrk", "-t", "2", "-c", str(clients), "-d", f"{round(args.seconds)}s", "--timeout", "60s"]
    with Sampler(url, pid) as sampler:
        started = time.perf_counter()
        out = subprocess.run(
            [*cmd, "-s", str(script), f"{url}/score"], env=env, capture_output=True, text=True, check=True
        ).stdout
        wall = time.perf_counter() - started
    scored_after, _ = scored_and_flagged(url)
    line = next(line for line in out.splitlines() if line.startswith("BENCH_JSON "))
    result = json.loads(line.removeprefix("BENCH_JSON "))
    statuses: dict[str, int] = {}
    for entry in result["statuses"]:
        for status, n in entry.items():
            statuses[status] = statuses.get(status, 0) + n
    wait_drained(url)
    after_status, after_ms = probe_once(url, body)
    notes = [f"{sampler.failures} /healthz probes failed"] if sampler.failures else []
    return OverloadPoint(
        frames_per_request=frames,
        clients=clients,
        seconds=round(wall, 1),
        load_average=round(load, 2),
        statuses=dict(sorted(statuses.items())),
        socket_errors=result["socket_errors"],
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        frames_scored_per_s=(scored_after - scored_before) / wall,
        peak_rss_mb=sampler.peak_rss_mb,
        healthz_p50_ms=percentile(sampler.healthz, 50) * 1000,
        healthz_p99_ms=percentile(sampler.healthz, 99) * 1000,
        healthz_probes=len(sampler.healthz),
        after_status=after_status,
        after_ms=after_ms,
        notes=notes,
    )


def probe_once(url: str, body: tuple[bytes, str]) -> tuple[int, float]:
    """One ordinary request after the storm: its status and latency."""
    import httpx

    started = time.perf_counter()
    response = httpx.post(f"{url}/score", content=body[0], headers={"Content-Type": body[1]}, timeout=60)
    return response.status_code, (time.perf_counter() - started) * 1000


def report(label: str, points: list[OverloadPoint], bodies: dict[int, int]) -> str:
    lines = [
        f"model {label}; request bodies: "
        + ", ".join(f"{f} frame(s) {size / 1024:.0f} KiB" for f, size in sorted(bodies.items())),
        "",
        "| frames/request | clients | statuses | socket errors | p50 ms | p99 ms | frames scored/s "
        "| peak RSS MB | /healthz p50 / p99 ms | after: status, ms | load avg |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for p in points:
        statuses = ", ".join(f"{s}: {n:,}" for s, n in p.statuses.items())
        lines.append(
            f"| {p.frames_per_request} | {p.clients} | {statuses} | {p.socket_errors} | {p.p50_ms:.1f} "
            f"| {p.p99_ms:.1f} | {p.frames_scored_per_s:,.0f} | {p.peak_rss_mb:.0f} "
            f"| {p.healthz_p50_ms:.1f} / {p.healthz_p99_ms:.1f} | {p.after_status}, {p.after_ms:.1f} "
            f"| {p.load_average:.2f} |"
        )
    only = all(set(p.statuses) <= {"200", "429"} and p.socket_errors == 0 for p in points)
    healthz = max(p.healthz_p99_ms for p in points)
    lines += [
        "",
        f"only 200 or 429, no socket errors: {'yes' if only else 'NO'}; "
        f"worst /healthz p99 {healthz:.1f} ms (target {HEALTHZ_P99_TARGET_MS:.0f}: "
        f"{'met' if healthz < HEALTHZ_P99_TARGET_MS else 'MISSED'}); "
        f"peak RSS {max(p.peak_rss_mb for p in points):.0f} MB; "
        f"served normally after every point: {'yes' if all(p.after_status == 200 for p in points) else 'NO'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repo", type=Path, default=None, help="model repository (default: models/)")
    parser.add_argument("--model", default=None, help="model name (default: the first in the repo)")
    parser.add_argument("--data", type=Path, default=None, help="take normal frames from this folder/shards")
    parser.add_argument(
        "--size", default="256x144", help="the test graph's input, WxH (only when no exported model is used)"
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--frames-per-request", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of load per point")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk; scripts/install-test-tools has it)")

    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        workdir = Path(tmp)
        repo, name, label = pick_model(args.repo, args.model, workdir, args.size)
        from service.registry import ModelRegistry

        loaded = ModelRegistry(repo).load(name)
        _, pngs = make_frames(loaded.input_size, 64, args.data, rule=loaded.resize_rule)
        print(f"model {label}; PNG {statistics.mean(map(len, pngs)) / 1024:.1f} KiB each", flush=True)
        process, url = start_server(repo, name, workdir)
        points: list[OverloadPoint] = []
        bodies: dict[int, int] = {}
        try:
            for frames in args.frames_per_request:
                body = (pngs[0], "image/png") if frames == 1 else multipart_body(pngs[:frames])
                bodies[frames] = len(body[0])
                for clients in args.clients:
                    point = run_point(url, process.pid, body, frames, clients, args, workdir)
                    points.append(point)
                    print(json.dumps(asdict(point)), flush=True)
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        text = report(label, points, bodies)
        print("\n" + text)
        if args.json:
            args.json.write_text(json.dumps([asdict(p) for p in points], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
