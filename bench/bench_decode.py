"""Time the service's decode of one request's frames: header probe, then decode + resize per frame.

    .venv/bin/python bench/bench_decode.py --data /tmp/svc_val --frames 32 --size 64

Prints milliseconds per request (mean of ``--repeat`` runs) for ``probe_payloads`` (headers only),
``decode_batch`` (the service's path: each frame decoded and resized by ``decode_resized``), and
``decode_frame`` alone (full-size decode, no resize), so the share of the pixel rule and the probe in
a request's cost can be read side by side in one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contract.frames import decode_frame  # noqa: E402
from service.decoding import Payload, PixelLimits, decode_batch, probe_payloads  # noqa: E402


def per_call_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="a folder of PNG/JPEG frames (searched recursively)"
    )
    parser.add_argument("--frames", type=int, default=32, help="frames per request")
    parser.add_argument("--size", type=int, default=64, help="the model's input side")
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    files = sorted(p for p in args.data.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not files:
        raise SystemExit(f"no PNG or JPEG frames under {args.data}")
    payloads = [Payload(p.name, p.read_bytes(), "image/png" if p.suffix == ".png" else "image/jpeg")
                for p in (files * args.frames)[: args.frames]]  # fmt: skip
    limits = PixelLimits(per_frame=16_000_000, per_request=128_000_000)
    rows = {
        "probe_payloads (headers)": lambda: probe_payloads(payloads, args.size, limits),
        "decode_batch (decode + resize, the service)": lambda: decode_batch(
            payloads, args.size, limits.per_frame
        ),
        "decode_frame only (no resize)": lambda: [decode_frame(p.data) for p in payloads],
    }
    print(f"{len(payloads)} frames per request from {args.data}, model input {args.size}x{args.size}")
    for name, fn in rows.items():
        print(f"  {name:45s} {per_call_ms(fn, args.repeat):7.2f} ms per request")


if __name__ == "__main__":
    main()
