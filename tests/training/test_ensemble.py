"""Ensemble runs: one head over a VAE run and a GAN run of the same data (training/ensemble.py).

An ensemble is a run directory like any other, so evaluate, export and the service need nothing new;
its members must share frames and seed, or its validation split would hold frames a member trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from conftest import TinyRun  # noqa: E402
from eval_helpers import (  # noqa: E402
    normal_frames,
    write_labelled_folder,
    write_tiny_gan_run,
)
from training_helpers import assert_parity  # noqa: E402

from edgecase.cli import main  # noqa: E402
from training.heads import available_heads, build_score_graph, default_head  # noqa: E402
from training.runs import load_config, save_config  # noqa: E402


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory, tiny_run: TinyRun) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ensemble")
    # no seg net: seconds, not minutes (test_seg_head.py covers it)
    return tiny_run("vae", root, seg_steps=0), tiny_run("gan", root, seg_steps=0)


def test_the_ensemble_command_fits_and_calibrates_one_head_over_both_runs(
    members: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ens"
    assert main(["ensemble", str(members[1]), str(members[0]), "--out", str(out)]) == 0
    assert "ensemble-combo" in capsys.readouterr().out
    config = load_config(out)
    assert config["kind"] == "ensemble" and config["size"] == 32
    assert config["members"] == [str(members[0].resolve()), str(members[1].resolve())]  # VAE first
    assert available_heads(out) == ["ensemble-combo"] and default_head("ensemble") == "ensemble-combo"
    record = json.loads((out / "banks" / "ensemble-combo.json").read_text())
    kinds = {name.split("-")[0] for name in record["candidates"]}
    assert kinds == {"vae", "gan"} and "gan-dfeat-knn" in record["candidates"]  # every member head
    assert record["selected"] and record["components"]  # of which the protocol kept one or more
    assert set(record["components"]) <= set(record["candidates"])
    assert len(record["center"]) == len(record["components"])
    assert (out / "calibration" / "ensemble-combo.json").is_file()


def test_the_ensemble_head_exports_and_matches_onnxruntime(
    members: tuple[Path, Path], tmp_path: Path
) -> None:
    from training.ensemble import create_ensemble

    graph = build_score_graph(create_ensemble(list(members), tmp_path / "ens"), "ensemble-combo")
    names = assert_parity(graph, normal_frames(5, seed=21), tmp_path / "ens.onnx")
    assert names == ["score", "anomaly_map"]


def test_runs_of_other_data_or_two_of_a_kind_are_refused_with_the_reason(
    members: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vae, gan = members
    other = write_tiny_gan_run(tmp_path / "other", write_labelled_folder(tmp_path / "data2", n_train=40))
    save_config(other, {**load_config(other), "seed": 7})
    assert main(["ensemble", str(vae), str(other), "--out", str(tmp_path / "e1")]) == 2
    assert "differ in seed" in capsys.readouterr().err
    assert main(["ensemble", str(gan), str(gan), "--out", str(tmp_path / "e2")]) == 2
    assert "two gan runs" in capsys.readouterr().err
    assert main(["ensemble", str(vae), str(tmp_path), "--out", str(tmp_path / "e3")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_an_ensemble_whose_member_moved_says_which(members: tuple[Path, Path], tmp_path: Path) -> None:
    from training.ensemble import create_ensemble

    out = create_ensemble(list(members), tmp_path / "ens")
    config = load_config(out)
    save_config(out, {**config, "members": [config["members"][0], str(tmp_path / "gone")]})
    with pytest.raises(FileNotFoundError, match="gone"):
        build_score_graph(out, "ensemble-combo")
