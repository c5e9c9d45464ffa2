"""`edgecase demo`: the main job end to end on the embedded default.

synth -> train -> export -> serve -> score sample frames over HTTP -> show what was flagged.
Every step is the real subcommand (same code a user runs), chained in one process, with a real
uvicorn server on loopback that is stopped at the end.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from edgecase.commands import add_command


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub,
        "demo",
        "Run the whole path on synthetic frames: synth, train, export, serve, score, show flagged.",
        "edgecase demo --workdir edgecase-demo --minutes 3",
    )
    parser.add_argument("--workdir", type=Path, default=Path("edgecase-demo"), help="where everything goes")
    parser.add_argument("--size", type=int, default=64, help="frame size in pixels (square)")
    parser.add_argument("--n-normal", type=int, default=4000, help="normal training frames to synthesise")
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget (wall clock)")
    parser.add_argument("--head", default="vae-elbo", help="score head to export and serve")
    parser.add_argument(
        "--per-family", type=int, default=6, help="test frames per family sent to the service"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=run)


def _step(n: int, text: str) -> None:
    print(f"\n== [{n}/6] {text}", flush=True)


def _cli(*argv: str) -> None:
    from edgecase.cli import CliError, main

    code = main(list(argv))
    if code != 0:
        raise CliError(f"step `edgecase {' '.join(argv)}` failed with exit code {code}")


def _sample_frames(data: Path, per_family: int) -> list[tuple[str, str, Path]]:
    """Pick test frames of every family (normal included) from a synth folder: (key, family, file)."""
    by_family: dict[str, list[tuple[str, str, Path]]] = defaultdict(list)
    with open(data / "labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["split"] == "test" and len(by_family[row["family"]]) < per_family:
                by_family[row["family"]].append((row["key"], row["family"], data / row["path"]))
    return [
        item for family in sorted(by_family, key=lambda f: (f != "normal", f)) for item in by_family[family]
    ]


def run(args: argparse.Namespace) -> int:
    import httpx

    from edgecase.cli import CliError

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the table
    work: Path = args.workdir.resolve()
    data, run_dir, repo, store = work / "data", work / "runs" / "vae", work / "models", work / "flagged"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    _step(1, f"synthesise driving frames -> {data}")
    if (data / "labels.csv").exists():
        print(f"reusing {data} (delete it to regenerate)")
    else:
        _cli("synth", "--out", str(data), "--size", str(args.size), "--n-normal", str(args.n_normal),
             "--seed", str(args.seed), "--format", "dir")  # fmt: skip
    print(f"contact sheet: {data / 'contact_sheet.png'}")

    _step(2, f"train a VAE on the normal frames ({args.minutes:g} min budget) -> {run_dir}")
    if (run_dir / "model.pt").exists():
        print(f"reusing {run_dir} (delete it to retrain)")
    else:
        # The seg head's net costs about 20 more minutes; train it only when the served head uses it.
        seg = [] if args.head in ("vae-seg", "vae-combo") else ["--seg-steps", "0"]
        _cli("train", "vae", "--data", str(data), "--out", str(run_dir), "--size", str(args.size),
             "--max-minutes", str(args.minutes), "--seed", str(args.seed), *seg)  # fmt: skip
    print(f"plots: {run_dir / 'plots'}")

    _step(3, f"export head {args.head} to ONNX, check parity, calibrate -> {repo}")
    name = f"demo-{args.head}"
    _cli("export", str(run_dir), "--head", args.head, "--repo", str(repo), "--name", name)

    from service.launch import free_port, wait_serving

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    _step(4, f"serve {repo} on {base}")
    env = dict(os.environ, EDGECASE_FLAGGED_DIR=str(store), EDGECASE_DEFAULT_MODEL=name)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgecase.cli",
            "serve",
            "--repo",
            str(repo),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],  # fmt: skip
        env=env,
    )
    try:
        if not wait_serving(base, server, timeout=120):
            code = server.poll()
            raise CliError(
                f"the server at {base} was not ready after 120 s"
                if code is None
                else f"the server exited early with code {code}"
            )
        print(httpx.get(f"{base}/models", timeout=10).json())

        _step(5, "score test frames of every family over HTTP (POST /score)")
        frames = _sample_frames(data, args.per_family)
        scored: Counter[str] = Counter()
        flagged: Counter[str] = Counter()
        with httpx.Client(base_url=base, timeout=60) as client:
            for key, family, path in frames:
                files = [("files", (key.replace("/", "_") + ".png", path.read_bytes(), "image/png"))]
                response = client.post("/score", files=files)
                response.raise_for_status()
                result = response.json()["results"][0]
                scored[family] += 1
                flagged[family] += bool(result["is_edge_case"])
        print(f"{'family':<14}{'sent':>6}{'flagged':>9}")
        for family in scored:
            print(f"{family:<14}{scored[family]:>6}{flagged[family]:>9}")

        _step(6, "what was flagged, and where it is kept")
        listing = httpx.get(f"{base}/flagged", params={"limit": 5}, timeout=10).json()
        print(f"{listing['total']} flagged frames in {store} (GET {base}/flagged)")
        for item in listing["items"]:
            print(
                f"  id={item['id']} score={item['score']:.4g} p={item['p_value']:.4f} key={item.get('key')}"
            )
        review = "-H 'content-type: application/json' -d '{\"label\": \"normal\"}'"
        print(f"review one:  curl -X POST {base}/flagged/<id>/review {review}")
        print(f"export them: edgecase flagged export --store {store} --review unreviewed --out {work}/review")
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"\ndone in {time.monotonic() - started:.0f} s; everything is under {work}")
    return 0
