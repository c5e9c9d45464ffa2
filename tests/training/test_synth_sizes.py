"""Synth frames at any H x W: wide frames through a metric pinhole camera, square frames as before.

What is specified here: the shape of 16:9, 4:3 and square frames; the pinhole rule for object sizes
(a pedestrian's pixel height is focal * height / distance, measured on the rendered pixels); the
object-distance knob; determinism and chunking at wide sizes; clear errors for bad sizes.
"""

from __future__ import annotations

import numpy as np
import pytest

from contract.frames import FrameSize
from training.synth import render_batch
from training.synth.api import chunk_frames
from training.synth.canvas import Canvas, paint_in_patches
from training.synth.draws import frame_generators
from training.synth.families import FAMILY_BY_NAME
from training.synth.pinhole import distance_range, focal_pixels
from training.synth.render import render_frames
from training.synth.shapes import box

MEAN_PERSON_M = 1.66
"""Mean drawn pedestrian height (0.5 lane widths x U(0.8, 1.1), lanes 3.5 m)."""


@pytest.mark.parametrize(
    ("size", "shape"),
    [
        ("256x144", (144, 256)),  # 16:9
        ("192x144", (144, 192)),  # 4:3
        (FrameSize(height=120, width=160), (120, 160)),  # 4:3 as the contract's type
        ((90, 160), (90, 160)),  # (height, width), a frame's shape
        (64, (64, 64)),  # square, as before
        ("64", (64, 64)),
    ],
)
def test_frames_have_the_requested_height_and_width(size: object, shape: tuple[int, int]) -> None:
    frames, _ = render_batch(0, 2, size, "rain")  # type: ignore[arg-type]
    assert frames.shape == (2, *shape, 3) and frames.dtype == np.uint8
    assert frames.std() > 10  # a scene, not a flat fill


@pytest.mark.parametrize("size", ["256x144", 144])
@pytest.mark.parametrize("family", ["normal", "pedestrian", "sensor_fault", "lens_dirt"])
def test_frames_are_deterministic_and_do_not_depend_on_the_batch(family: str, size: object) -> None:
    """(sensor_fault at 144 once caught a tree line taller than the hills cut off by the batch's rows.)"""
    a, sa = render_batch(9, 5, size, family)  # type: ignore[arg-type]
    b, sb = render_batch(9, 5, size, family)  # type: ignore[arg-type]
    few, _ = render_batch(9, 2, size, family)  # type: ignore[arg-type]
    other, _ = render_batch(10, 5, size, family)  # type: ignore[arg-type]
    assert a.tobytes() == b.tobytes() and np.array_equal(sa, sb)
    assert np.array_equal(a[:2], few)
    assert not np.array_equal(a, other)


def test_full_hd_renders_one_frame_per_chunk() -> None:
    assert chunk_frames("1920x1080") == 1
    assert chunk_frames(64) == 512 and chunk_frames("256x144") == 56
    frames, _ = render_batch(0, 1, "1920x1080")
    assert frames.shape == (1, 1080, 1920, 3)


def _pedestrian_heights(size: str, strength: float, n: int = 16) -> tuple[list[int], np.ndarray]:
    """Pixel height of the person in each frame: the rows where it changed the same scene."""
    normal = render_frames(frame_generators(4, (6, 0), range(n)), size, None)
    person = render_frames(
        frame_generators(4, (6, 0), range(n)),
        size,
        FAMILY_BY_NAME["pedestrian"],
        np.full(n, strength, np.float32),
    )
    diff = np.abs(person.frames.astype(int) - normal.frames.astype(int)).max(axis=3) > 10
    heights = []
    for changed in diff:
        rows = np.nonzero(changed.any(axis=1))[0]
        heights.append(int(rows.max() - rows.min() + 1) if len(rows) else 0)
    return heights, person.distance


@pytest.mark.parametrize("size", ["256x144", "512x288"])
def test_a_pedestrian_is_as_tall_as_the_pinhole_rule_says(size: str) -> None:
    """focal * 1.66 m / distance: ~25 px at 15 m and ~6 px at 60 m at 256x144, twice that at 512x288."""
    focal = focal_pixels(*FrameSize(*reversed([int(v) for v in size.split("x")])))
    medians = {}
    for strength, metres in ((1.0, 15.0), (0.3, 60.0)):
        heights, distance = _pedestrian_heights(size, strength)
        assert np.allclose(distance, metres)  # strength 1 is the near end of 15-60 m, 0.3 the far end
        expected = focal * MEAN_PERSON_M / metres
        medians[metres] = float(np.median(heights))
        assert abs(medians[metres] - expected) <= max(1.5, 0.15 * expected), (size, metres, heights, expected)
    assert 3.0 <= medians[15.0] / medians[60.0] <= 5.0  # four times nearer, four times taller


def test_the_object_distance_range_places_objects_farther() -> None:
    """Strength 1 is the range's near end: 15 m by default, 25 m with 25-80, so the deer is smaller."""
    deer, n = FAMILY_BY_NAME["animal"], 12
    ones = np.ones(n, np.float32)
    normal = render_frames(frame_generators(2, (6, 0), range(n)), "256x144", None).frames
    near = render_frames(frame_generators(2, (6, 0), range(n)), "256x144", deer, ones)
    far = render_frames(
        frame_generators(2, (6, 0), range(n)), "256x144", deer, ones, object_distance=(25, 80)
    )
    assert np.allclose(near.distance, 15.0) and np.allclose(far.distance, 25.0)

    def changed(frames: np.ndarray) -> float:
        return float(
            np.median((np.abs(frames.astype(int) - normal.astype(int)).max(axis=3) > 10).sum(axis=(1, 2)))
        )

    # Area falls with the square of the distance: (15 / 25)^2 = 0.36.
    assert 0.2 <= changed(far.frames) / changed(near.frames) <= 0.55
    drawn = render_frames(frame_generators(3, (6, 0), range(40)), "256x144", FAMILY_BY_NAME["construction"])
    assert drawn.distance.min() >= 15.0 and drawn.distance.max() <= 60.0 and drawn.distance.std() > 5


def test_square_frames_record_no_distance_and_normal_frames_none() -> None:
    square = render_frames(frame_generators(0, (6, 0), range(3)), 64, FAMILY_BY_NAME["pedestrian"])
    normal = render_frames(frame_generators(0, (6, 0), range(3)), "256x144", None)
    assert np.isnan(square.distance).all() and np.isnan(normal.distance).all()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("16x9", "sides must be from 32 to 4096"),
        (300, "square frame must be from 32 to 256"),
        ("256x", "must be N or WxH"),
        ("0x144", "positive"),
        (True, "must be N or WxH"),
    ],
)
def test_bad_sizes_are_refused_with_the_accepted_forms(bad: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_batch(0, 1, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["60-15", "1-10", "15", "a-b", (15, 400)])
def test_bad_object_distances_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="object distance must"):
        distance_range(bad)  # type: ignore[arg-type]


def test_painting_in_patches_equals_painting_the_whole_wide_frame() -> None:
    """Patches of a wide canvas carry the frame's x offset: same pixels as painting everything."""
    n = 3
    x = np.array([-0.3, 0.5, 1.25], np.float32)  # left of, inside and right of the centre square
    y, sc = np.full(n, 0.8, np.float32), np.array([0.05, 0.2, 0.6], np.float32)
    colour = np.broadcast_to(np.array([1.0, 0.5, 0.0], np.float32), (n, 3))
    whole, patched = Canvas.blank(n, 90, 160), Canvas.blank(n, 90, 160)
    whole.composite(box(whole, x, y, sc, -0.5, 0.5, 0.0, 1.0), colour)

    def draw(p: Canvas, f: np.ndarray) -> None:
        p.composite(box(p, x[f], y[f], sc[f], -0.5, 0.5, 0.0, 1.0), colour[f])

    bounds = (x - 0.5 * sc, y - sc, x + 0.5 * sc, y + np.float32(0.01))
    paint_in_patches(patched, np.ones(n, bool), bounds, draw)
    assert whole.img.max() == 1.0 and np.array_equal(whole.img, patched.img)


@pytest.mark.parametrize(("size", "cell"), [("256x144", (144, 256)), ("1920x1080", (135, 240))])
def test_the_contact_sheet_keeps_the_aspect_and_stays_small(size: str, cell: tuple[int, int]) -> None:
    """Full-HD frames are shown (and rendered for the sheet) 135x240: a sheet, not 96 HD renders."""
    from training.synth.contact_sheet import HEADER_H, LABEL_W, PAD, PER_ROW, contact_sheet_image

    sheet = contact_sheet_image(size, 0, ("pedestrian",))
    cell_h, cell_w = cell
    assert sheet.size == (LABEL_W + PER_ROW * (cell_w + PAD) + PAD, HEADER_H + 2 * (cell_h + PAD) + PAD)
