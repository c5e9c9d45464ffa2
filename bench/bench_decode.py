"""Time the service's decode of one request's frames: header probe, then decode + resize per frame.

    .venv/bin/python bench/bench_decode.py --frames 32 --size 256x144
    .venv/bin/python bench/bench_decode.py --data /tmp/svc_val --frames 32 --size 64

Prints milliseconds per request (mean of ``--repeat`` runs) for ``probe_payloads`` (headers only),
``decode_batch`` (the service's path: each frame decoded and resized by ``decode_resized`` to the
model's ``--size`` by ``--rule``, a JPEG at its draft scale), and ``decode_frame`` alone (full-size
decode, no draft, no resize), so the share of the pixel rule and the probe in a request's cost can be
read side by side in one run. Without ``--data`` the frames are camera-sized JPEGs (``--frame-size``,
default 1920x1080, quality 90) made here: gradients, blocks and noise, so they compress like a scene.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contract.frames import RESIZE_RULES, decode_frame, frame_size  # noqa: E402
from service.decoding import Payload, PixelLimits, decode_batch, probe_payloads  # noqa: E402


def per_call_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat * 1e3


def camera_jpegs(width: int, height: int, count: int) -> list[bytes]:
    """``count`` distinct ``width x height`` JPEGs (q 90) with structure at every scale."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([255 * xs / width, 255 * ys / height, 128 + 0 * xs], axis=2)
    out = []
    for _ in range(count):
        blocks = rng.integers(-60, 61, (height // 16 + 1, width // 16 + 1, 3)).repeat(16, 0).repeat(16, 1)
        pixels = base + blocks[:height, :width] + rng.normal(0, 12, (height, width, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="a folder of PNG/JPEG frames (searched recursively)"
    )
    parser.add_argument("--frames", type=int, default=32, help="frames per request")
    parser.add_argument("--size", default="256x144", help="the model's input, WxH or N (default 256x144)")
    parser.add_argument("--rule", choices=RESIZE_RULES, default=RESIZE_RULES[0], help="the resize rule")
    parser.add_argument(
        "--frame-size", default="1920x1080", help="without --data: made JPEG frames, WxH (default 1920x1080)"
    )
    parser.add_argument("--distinct", type=int, default=4, help="without --data: distinct made frames")
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    size = frame_size(args.size)
    if args.data is not None:
        files = sorted(p for p in args.data.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
        if not files:
            raise SystemExit(f"no PNG or JPEG frames under {args.data}")
        blobs = [(p.read_bytes(), "image/png" if p.suffix == ".png" else "image/jpeg") for p in files]
        source = str(args.data)
    else:
        camera = frame_size(args.frame_size)
        blobs = [(b, "image/jpeg") for b in camera_jpegs(camera.width, camera.height, args.distinct)]
        source = f"{args.distinct} made {camera} JPEGs (q 90)"
    payloads = [
        Payload(str(i), data, kind) for i, (data, kind) in enumerate((blobs * args.frames)[: args.frames])
    ]
    limits = PixelLimits(per_frame=40_000_000, per_request=2_000_000_000)
    rows = {
        "probe_payloads (headers)": lambda: probe_payloads(payloads, size, limits, rule=args.rule),
        "decode_batch (decode + resize, the service)": lambda: decode_batch(
            payloads, size, limits.per_frame, rule=args.rule
        ),
        "decode_frame only (full size, no resize)": lambda: [decode_frame(p.data) for p in payloads],
    }
    print(f"{len(payloads)} frames per request from {source}; model input {size} (W x H) by {args.rule}; "
          f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
    for name, fn in rows.items():
        print(f"  {name:45s} {per_call_ms(fn, args.repeat):7.2f} ms per request")


if __name__ == "__main__":
    main()
