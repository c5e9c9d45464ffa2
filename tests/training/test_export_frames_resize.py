"""The export path reads its calibration normals by the one resize rule the manifest names.

Export calibrates the threshold on held-out normals it reads itself (training/export_frames.py); those
frames must be what the service will make of the same camera frames, or the threshold is set on
other pixels than the ones scored. 16:9, 4:3 and square camera frames, into a wide model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from contract.frames import RESIZE_RULE, encode_png, frame_size, resize_frame
from training.export_frames import read_normal_frames


@pytest.mark.parametrize("source_hw", [(90, 160), (120, 160), (100, 100)], ids=["16:9", "4:3", "square"])
def test_calibration_frames_are_the_fit_pad_frames_the_service_scores(
    tmp_path: Path, source_hw: tuple[int, int]
) -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (*source_hw, 3), dtype=np.uint8)
    folder = tmp_path / "val"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode_png(frame))
    size = frame_size("64x36")
    [read] = read_normal_frames(folder, size)
    np.testing.assert_array_equal(read, resize_frame(frame, size, RESIZE_RULE))
    if source_hw != (90, 160):  # other aspects than the model's: black bars, nothing cropped
        assert read[:, :2].max() == 0 and read[:, -2:].max() == 0
