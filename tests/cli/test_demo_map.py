"""The demo's map figure: the frame and the service's anomaly map, side by side, at the map's size."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

from contract.frames import encode_png
from edgecase.commands.demo_map import SCALE, heat, map_figure


def _map_png(grey: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_figure_puts_the_map_beside_the_frame_where_the_service_saw_the_object(tmp_path: Path) -> None:
    frame = np.full((144, 256, 3), 90, dtype=np.uint8)
    grey = np.zeros((144, 256), dtype=np.uint8)
    grey[60:90, 200:210] = 255  # a pedestrian-sized hot spot on the right
    out = map_figure(encode_png(frame), {"anomaly_map": _map_png(grey)}, tmp_path / "map.png")
    assert out is not None
    figure = np.array(Image.open(out))
    assert figure.shape == (144 * SCALE, (256 * 2 + 4) * SCALE, 3)
    right = figure[:, (256 + 4) * SCALE :]
    assert (right[75 * SCALE, 205 * SCALE] == 255).all() and right[10 * SCALE, 10 * SCALE].max() == 0
    assert (figure[75 * SCALE, 100 * SCALE] == 90).all(), "the left half is the frame"


def test_a_head_without_a_map_gives_no_figure(tmp_path: Path) -> None:
    assert (
        map_figure(encode_png(np.zeros((8, 8, 3), np.uint8)), {"anomaly_map": None}, tmp_path / "m.png")
        is None
    )
    assert not (tmp_path / "m.png").exists()


def test_heat_runs_from_black_through_red_to_white() -> None:
    ramp = heat(np.array([[0, 128, 255]], dtype=np.uint8))[0]
    assert ramp[0].tolist() == [0, 0, 0] and ramp[2].tolist() == [255, 255, 255]
    assert ramp[1][0] == 255 and ramp[1][2] == 0
