"""Specification of data on disk: writers, readers and labels.csv agree on keys, pixels and metadata.

Bad data is counted and skipped, never fatal: corrupt frames, truncated shards and unreadable
Parquet files are reported by source and key while the other frames are still read.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from contract.frames import encode_png
from contract.labels import LabelRow, LabelsError, is_normal, read_labels, write_labels
from contract.readers import Frame, ReadReport, count_frames, iter_frames
from contract.writers import open_writer

FORMATS = ["dir", "tar", "parquet"]


def _frames(n: int, height: int = 10, width: int = 14, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def _synth_like(out: Path, fmt: str, n: int = 7, shard_size: int = 3) -> list[LabelRow]:
    """Write frames the way `edgecase synth` does: writer + labels.csv, keys split/family/name."""
    rows: list[LabelRow] = []
    images = _frames(n)
    with open_writer(out, fmt, "test", shard_size=shard_size) as writer:  # type: ignore[arg-type]
        for index, image in enumerate(images):
            family = "normal" if index % 2 == 0 else "fog"
            key = f"test/{family}/{family}_{index:06d}"
            strength = 0.0 if family == "normal" else index / 10
            meta = {"family": family, "split": "test", "strength": strength}
            path = writer.write(key, image, meta)
            rows.append(LabelRow(key, path, "test", family, strength))
    write_labels(out, rows)
    return rows


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_writers_and_readers_round_trip_keys_pixels_and_meta(tmp_path: Path, fmt: str) -> None:
    images = _frames(7)
    rows = _synth_like(tmp_path, fmt)
    report = ReadReport()
    frames = list(iter_frames(tmp_path, report=report))
    assert sorted(frame.key for frame in frames) == sorted(row.key for row in rows)
    by_key = {frame.key: frame for frame in frames}
    for index, row in enumerate(rows):
        frame = by_key[row.key]
        np.testing.assert_array_equal(frame.image, images[index])
        assert frame.meta == {"family": row.family, "split": "test", "strength": row.strength}
        assert Path(frame.source).relative_to(tmp_path).as_posix() == row.path
    assert (report.ok, report.failed, report.errors) == (7, 0, [])


@pytest.mark.parametrize("fmt", FORMATS)
def test_writers_shard_and_return_the_holding_file(tmp_path: Path, fmt: str) -> None:
    rows = _synth_like(tmp_path, fmt, n=7, shard_size=3)
    if fmt == "dir":
        assert [row.path for row in rows] == [f"{row.key}.png" for row in rows]
    else:
        suffix = "." + fmt
        expected = [f"test-{index // 3:05d}{suffix}" for index in range(7)]
        assert [row.path for row in rows] == expected
        assert sorted(p.name for p in tmp_path.glob(f"*{suffix}")) == sorted(set(expected))
    assert not list(tmp_path.rglob("*.tmp")), "no temporary files left behind"


def test_all_formats_yield_identical_frames(tmp_path: Path) -> None:
    results = []
    for fmt in FORMATS:
        _synth_like(tmp_path / fmt, fmt)
        results.append({frame.key: frame for frame in iter_frames(tmp_path / fmt)})
    from_dir = results[0]
    for other in results[1:]:
        assert sorted(other) == sorted(from_dir)
        for key, frame in from_dir.items():
            np.testing.assert_array_equal(other[key].image, frame.image)
            assert other[key].meta == frame.meta


def test_tar_shards_follow_the_webdataset_layout(tmp_path: Path) -> None:
    _synth_like(tmp_path, "tar", n=2, shard_size=10)
    with tarfile.open(tmp_path / "test-00000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("test/fog/fog_000001.json").read())  # type: ignore[union-attr]
    assert names == [
        "test/normal/normal_000000.png",
        "test/normal/normal_000000.json",
        "test/fog/fog_000001.png",
        "test/fog/fog_000001.json",
    ]
    assert meta == {"family": "fog", "split": "test", "strength": 0.1}


def test_parquet_shards_have_key_image_and_meta_columns(tmp_path: Path) -> None:
    _synth_like(tmp_path, "parquet", n=2, shard_size=10)
    table = pq.read_table(tmp_path / "test-00000.parquet")
    assert table.column_names == ["key", "image", "family", "split", "strength"]
    assert table.schema.field("image").type == pa.binary()
    assert table.schema.field("strength").type == pa.float64()
    assert table.column("image")[0].as_py().startswith(b"\x89PNG")


def test_reading_is_deterministic(tmp_path: Path) -> None:
    _synth_like(tmp_path, "dir", n=9)
    first = [frame.key for frame in iter_frames(tmp_path)]
    assert first == [frame.key for frame in iter_frames(tmp_path)]
    assert first == sorted(first)


# --- folders of user images -------------------------------------------------------------------


def test_folders_are_read_recursively_with_relative_keys(tmp_path: Path) -> None:
    frame = _frames(1)[0]
    (tmp_path / "cam1" / "day").mkdir(parents=True)
    Image.fromarray(frame).save(tmp_path / "cam1" / "day" / "0001.png")
    Image.fromarray(frame).save(tmp_path / "cam1" / "0002.JPG", format="JPEG")
    Image.fromarray(frame).save(tmp_path / "b.webp", lossless=True)
    Image.fromarray(frame).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(frame).convert("RGBA").save(tmp_path / "alpha.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / ".hidden.png").write_bytes(b"ignored")
    frames = list(iter_frames(tmp_path))
    assert [f.key for f in frames] == ["alpha", "b", "cam1/0002", "cam1/day/0001", "grey"]
    for f in frames:
        assert f.image.dtype == np.uint8 and f.image.shape == (10, 14, 3)
    np.testing.assert_array_equal(frames[0].image, frame)


def test_folder_labels_give_loose_images_their_meta(tmp_path: Path) -> None:
    Image.fromarray(_frames(1)[0]).save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("path,family\na.png,deer\n")
    (frame,) = iter_frames(tmp_path)
    assert frame.meta == {"family": "deer", "split": "test", "strength": 0.0}


def test_in_a_labelled_folder_only_listed_images_are_frames(tmp_path: Path) -> None:
    """A synth folder's contact sheet (or any plot beside the data) is not a frame."""
    Image.fromarray(_frames(1)[0]).save(tmp_path / "a.png")
    Image.fromarray(_frames(1)[0]).save(tmp_path / "contact_sheet.png")
    (tmp_path / "labels.csv").write_text("path,family\na.png,normal\n")
    report = ReadReport()
    assert [f.key for f in iter_frames(tmp_path, report=report)] == ["a"]
    assert report.ok == 1 and report.failed == 0


def test_a_broken_labels_file_is_reported_but_images_are_still_read(tmp_path: Path) -> None:
    Image.fromarray(_frames(1)[0]).save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("path,split\na.png,test\n")
    report = ReadReport()
    (frame,) = iter_frames(tmp_path, report=report)
    assert frame.meta == {} and report.ok == 1 and report.failed_sources == 1
    assert "missing column 'family'" in report.errors[0][2]


def test_labels_of_shard_folders_are_not_needed_to_read_them(tmp_path: Path) -> None:
    _synth_like(tmp_path, "tar")
    (tmp_path / "labels.csv").write_text("broken")
    report = ReadReport()
    assert len(list(iter_frames(tmp_path, report=report))) == 7
    assert report.errors == []


def test_size_resizes_every_frame_by_the_one_rule(tmp_path: Path) -> None:
    _synth_like(tmp_path, "tar")
    frames = list(iter_frames(tmp_path / "test-00000.tar", size=6))
    assert [f.image.shape for f in frames] == [(6, 6, 3)] * 3


def test_keys_filter_picks_a_subset(tmp_path: Path) -> None:
    rows = _synth_like(tmp_path, "parquet")
    wanted = {row.key for row in rows if not is_normal(row.family)}
    report = ReadReport()
    frames = list(iter_frames(tmp_path, keys=wanted, report=report))
    assert {f.key for f in frames} == wanted
    assert report.ok == len(wanted) and report.failed == 0


def test_several_sources_are_read_in_the_given_order(tmp_path: Path) -> None:
    _synth_like(tmp_path / "t", "tar")
    _synth_like(tmp_path / "p", "parquet")
    sources = [tmp_path / "t" / "test-00002.tar", str(tmp_path / "p" / "test-00000.parquet")]
    keys = [f.key for f in iter_frames(sources)]
    assert keys == [
        "test/normal/normal_000006",  # the tar shard first, as given
        "test/normal/normal_000000",
        "test/fog/fog_000001",
        "test/normal/normal_000002",
    ]


def test_count_frames_counts_candidates_in_every_format(tmp_path: Path) -> None:
    for fmt in FORMATS:
        _synth_like(tmp_path / fmt, fmt)
    assert count_frames(tmp_path) == 21
    assert count_frames([tmp_path / "tar" / "test-00000.tar"]) == 3


# --- bad data is counted and skipped ----------------------------------------------------------


def test_corrupt_image_in_a_folder_is_skipped_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _synth_like(tmp_path, "dir", n=5)
    bad = tmp_path / "test" / "fog" / "fog_000003.png"
    bad.write_text("I am text pretending to be a PNG")
    report = ReadReport()
    with caplog.at_level(logging.WARNING, logger="contract.readers"):
        frames = list(iter_frames(tmp_path, report=report))
    assert len(frames) == 4 and report.ok == 4 and report.failed == 1
    source, key, reason = report.errors[0]
    assert (source, key) == (str(bad), "test/fog/fog_000003")
    assert "not a recognised image" in reason
    assert "test/fog/fog_000003" in caplog.text and str(bad) in caplog.text
    assert "skipped 1" in report.summary()


def test_corrupt_member_in_a_tar_shard_is_skipped_and_reported(tmp_path: Path) -> None:
    good = [encode_png(image) for image in _frames(3)]
    truncated_png = good[0][: len(good[0]) // 2]
    shard = tmp_path / "data-00000.tar"
    shard.write_bytes(
        _tar_bytes(
            [
                ("a.png", good[0]),
                ("a.json", b'{"family": "normal"}'),
                ("b.png", truncated_png),
                ("c.jpg", good[1]),  # wrong extension for PNG bytes: Pillow sniffs the content
                ("d.json", b"{}"),  # metadata without an image
                ("e.png", good[2]),
            ]
        )
    )
    report = ReadReport()
    frames = list(iter_frames(shard, report=report))
    assert [f.key for f in frames] == ["a", "c", "e"]
    assert frames[0].meta == {"family": "normal"}
    assert report.ok == 3 and report.failed == 2
    assert [(s, k) for s, k, _ in report.errors] == [(str(shard), "b"), (str(shard), "d")]
    assert "truncated" in report.errors[0][2] and "no image member" in report.errors[1][2]


def test_corrupt_row_in_parquet_is_skipped_and_reported(tmp_path: Path) -> None:
    good = [encode_png(image) for image in _frames(3)]
    path = tmp_path / "rows.parquet"
    pq.write_table(
        pa.table(
            {
                "key": ["r0", "r1", "r2", "r3"],
                "image": [good[0], b"\x89PNG garbage", good[1], good[2]],
                "camera": ["front", "front", "rear", "rear"],
            }
        ),
        path,
        row_group_size=2,
    )
    report = ReadReport()
    frames = list(iter_frames(path, report=report))
    assert [f.key for f in frames] == ["r0", "r2", "r3"]
    assert frames[1].meta == {"camera": "rear"}
    assert report.failed == 1 and report.errors[0][:2] == (str(path), "r1")


def test_parquet_image_column_may_be_a_hugging_face_struct(tmp_path: Path) -> None:
    png = encode_png(_frames(1)[0])
    path = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"key": ["x"], "image": [{"bytes": png, "path": "x.png"}]}), path)
    (frame,) = iter_frames(path)
    np.testing.assert_array_equal(frame.image, _frames(1)[0])


@pytest.mark.parametrize("cut", ["mid-member", "on-member-boundary"])
def test_truncated_tar_is_reported_and_other_shards_are_still_read(tmp_path: Path, cut: str) -> None:
    _synth_like(tmp_path, "tar", n=7, shard_size=3)  # shards 00000, 00001 (3 frames), 00002 (1)
    shard = tmp_path / "test-00000.tar"
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    third_png = members[4]  # the first member of the third frame
    end = third_png.offset_data + 100 if cut == "mid-member" else third_png.offset
    shard.write_bytes(data[:end])
    report = ReadReport()
    keys = [f.key for f in iter_frames(tmp_path, report=report)]
    assert keys == [
        "test/normal/normal_000000",
        "test/fog/fog_000001",
        "test/fog/fog_000003",
        "test/normal/normal_000004",
        "test/fog/fog_000005",
        "test/normal/normal_000006",
    ]
    assert report.failed_sources == 1
    source, key, reason = report.errors[0]
    assert source == str(shard) and key == "" and "truncated" in reason
    assert "unreadable file" in report.summary()


def test_unreadable_parquet_is_reported_and_reading_continues(tmp_path: Path) -> None:
    _synth_like(tmp_path, "parquet", n=4, shard_size=2)
    (tmp_path / "test-00000.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.table({"name": ["x"], "png": [b""]}), tmp_path / "other.parquet")
    report = ReadReport()
    keys = [f.key for f in iter_frames(tmp_path, report=report)]
    assert keys == ["test/normal/normal_000002", "test/fog/fog_000003"]
    assert report.failed_sources == 2
    reasons = {Path(source).name: reason for source, _, reason in report.errors}
    assert "unreadable Parquet" in reasons["test-00000.parquet"]
    assert "missing column(s) key, image" in reasons["other.parquet"]


def test_a_missing_source_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        iter_frames([tmp_path, tmp_path / "nope"])  # checked at the call, before any reading
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        iter_frames(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="size"):
        iter_frames(tmp_path, size=0)


def test_frames_are_plain_dataclasses(tmp_path: Path) -> None:
    _synth_like(tmp_path, "dir", n=1)
    (frame,) = iter_frames(tmp_path)
    assert isinstance(frame, Frame) and frame.image.flags.writeable


# --- writers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_a_crash_leaves_no_shard_under_its_final_name(tmp_path: Path, fmt: str) -> None:
    images = _frames(5)
    with pytest.raises(RuntimeError, match="boom"), open_writer(tmp_path, fmt, "train", shard_size=2) as w:  # type: ignore[arg-type]
        for index, image in enumerate(images):
            w.write(f"k{index}", image, {"family": "normal"})
            if index == 2:
                raise RuntimeError("boom")
    finished = sorted(p.name for p in tmp_path.iterdir())
    assert finished == [f"train-00000.{fmt}"], "only the completed shard is there, and no temp files"
    assert [f.key for f in iter_frames(tmp_path)] == ["k0", "k1"]


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "a/b.c", "a\\b", "a/./b"])
def test_writers_refuse_keys_that_cannot_round_trip(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="key"), open_writer(tmp_path, "tar", "test") as writer:
        writer.write(key, _frames(1)[0], {})


def test_writers_refuse_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown format"), open_writer(tmp_path, "zip", "test"):  # type: ignore[arg-type]
        pass
    with pytest.raises(ValueError, match="shard_size"), open_writer(tmp_path, "tar", "test", shard_size=0):
        pass
    with pytest.raises(ValueError, match="split"), open_writer(tmp_path, "tar", "a/b"):
        pass


def test_parquet_writer_needs_the_same_meta_fields_for_every_frame(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="differ"), open_writer(tmp_path, "parquet", "test") as writer:
        writer.write("a", _frames(1)[0], {"family": "fog"})
        writer.write("b", _frames(1)[0], {"family": "fog", "extra": 1})
    with pytest.raises(ValueError, match="clash"), open_writer(tmp_path, "parquet", "test") as writer:
        writer.write("a", _frames(1)[0], {"image": "x"})


def test_writers_accept_ready_png_bytes(tmp_path: Path) -> None:
    image = _frames(1)[0]
    with open_writer(tmp_path, "tar", "test") as writer:
        writer.write("a", encode_png(image), {})
        with pytest.raises(ValueError, match="PNG"):
            writer.write("b", b"GIF89a...", {})
    (frame,) = iter_frames(tmp_path)
    np.testing.assert_array_equal(frame.image, image)


# --- labels.csv -------------------------------------------------------------------------------


def test_labels_round_trip(tmp_path: Path) -> None:
    rows = [
        LabelRow("train/normal/normal_000000", "train-00000.tar", "train", "normal", 0.0),
        LabelRow("test/fog/fog_000001", "test-00000.tar", "test", "fog", 0.1 + 0.2),
    ]
    path = write_labels(tmp_path, rows)
    assert path == tmp_path / "labels.csv"
    assert path.read_text().splitlines()[0] == "key,path,split,family,strength"
    assert read_labels(tmp_path) == rows


def test_user_labels_need_only_path_and_family(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text(
        "\ufeffPath, Family ,Note\n./cam1/0001.jpg,normal,x\ncam1\\0002.png,Deer,\n", encoding="utf-8"
    )
    rows = read_labels(tmp_path / "labels.csv")
    assert rows == [
        LabelRow("cam1/0001", "cam1/0001.jpg", "test", "normal", 0.0),
        LabelRow("cam1/0002", "cam1/0002.png", "test", "Deer", 0.0),
    ]
    assert [row.normal for row in rows] == [True, False]


def test_user_labels_with_key_only(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("key,family,split,strength\nk1,fog,val,0.5\n")
    assert read_labels(tmp_path) == [LabelRow("k1", "", "val", "fog", 0.5)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path,split\na.png,test\n", "missing column 'family'"),
        ("name,family\na,normal\n", "needs a 'key' or a 'path' column"),
        ("path,family\na.png,\n", ":2: empty 'family'"),
        ("path,family,split\na.png,fog,holdout\n", "split 'holdout'"),
        ("path,family,strength\na.png,fog,lots\n", "not a number"),
        ("path,family,strength\na.png,fog,1.5\n", "outside"),
        ("path,family\na.png,fog\na.jpg,fog\n", "already labelled on line 2"),
        ("path,family\nshard.tar,fog\n", "is a shard"),
        ("", "empty file"),
    ],
)
def test_bad_labels_name_the_file_and_the_problem(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(LabelsError, match=message) as info:
        read_labels(tmp_path)
    assert str(tmp_path / "labels.csv") in str(info.value)


def test_missing_labels_file_says_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="key, path, split, family, strength"):
        read_labels(tmp_path)


def test_is_normal_ignores_case_and_spaces() -> None:
    assert is_normal("normal") and is_normal(" Normal ") and not is_normal("fog")
