"""`edgecase train` and training.vae_train: what a run directory holds, determinism, resume, stopping.

Runs use tiny networks (width 4, latent 8) on 32 px frames and skip calibration (another module's
job, tested there) unless the test is about the full dry run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from edgecase.cli import main
from tests.training_helpers import write_tiny_synth
from training import runs, vae_train
from training.vae_train import VAEConfig, train_vae


def tiny_config(**overrides: object) -> VAEConfig:
    base = dict(
        size=32, width=4, latent_dim=8, batch_size=8, epochs=2, lr=1e-3, device="cpu", calibrate=False
    )
    return VAEConfig(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny networks run faster on one thread, most of all on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the PNGs (checked by the dry-run test) where a test is about the loop itself."""
    monkeypatch.setattr(vae_train, "write_plots", lambda *args, **kwargs: None)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_synth(tmp_path_factory.mktemp("data") / "synth", n_train=16, n_val=6, n_test=3)


def weights(run_dir: Path, name: str = "checkpoint.pt") -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / name, weights_only=False)
    return state["model"] if "model" in state else state["state_dict"]


def epochs_of(run_dir: Path) -> list[int]:
    return [r["epoch"] for r in runs.read_history(run_dir)]


def test_dry_run_from_the_command_line_writes_a_complete_run(synth_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "edgecase.cli", "train", "vae", "--data", str(synth_dir), "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--dry-run", "--size", "32", "--width", "8", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("config.json", "model.pt", "checkpoint.pt", "history.jsonl"):
        assert (out / name).is_file(), name
    for plot in ("loss", "reconstructions", "samples", "tsne"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 0, plot
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "vae" and config["size"] == "32x32" and config["width"] == 8
    assert config["data"] == [str(synth_dir)] and len(config["data_fingerprint"]) == 64
    assert config["versions"]["torch"].startswith("2.")
    assert len(runs.read_history(out)) == 1
    model = torch.load(out / "model.pt", weights_only=True)
    assert model["kind"] == "vae" and model["arch"]["width"] == 8
    assert (out / "calibration" / "vae-elbo.json").is_file()  # calibration ran at the end


@pytest.mark.usefixtures("no_plots")
def test_dry_run_without_data_uses_noise_frames(tmp_path: Path) -> None:
    run_dir = train_vae(tiny_config(dry_run=True), [], tmp_path / "run")
    assert (run_dir / "model.pt").is_file()
    assert json.loads((run_dir / "config.json").read_text())["data"] == []


@pytest.mark.usefixtures("no_plots")
def test_same_seed_on_cpu_gives_identical_weights_and_history(synth_dir: Path, tmp_path: Path) -> None:
    a = train_vae(tiny_config(), [str(synth_dir)], tmp_path / "a")
    b = train_vae(tiny_config(), [str(synth_dir)], tmp_path / "b")
    c = train_vae(tiny_config(seed=1), [str(synth_dir)], tmp_path / "c")
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)

    def losses(run_dir: Path) -> list[float]:
        return [r["val_bpd"] for r in runs.read_history(run_dir)]

    assert losses(a) == losses(b)


@pytest.mark.usefixtures("no_plots")
def test_resume_continues_from_the_checkpoint_epoch_exactly(synth_dir: Path, tmp_path: Path) -> None:
    straight = train_vae(tiny_config(epochs=3, patience=10), [str(synth_dir)], tmp_path / "straight")
    part = train_vae(tiny_config(epochs=1, patience=10), [str(synth_dir)], tmp_path / "part")
    assert epochs_of(part) == [1]
    resumed = train_vae(tiny_config(epochs=3, patience=10), [], tmp_path / "part", resume=True)
    assert epochs_of(resumed) == [1, 2, 3]
    w1, w2 = weights(straight), weights(resumed)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_early_stopping_ends_a_run_that_stops_improving(
    synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_plots: None
) -> None:
    # a validation loss that never improves after epoch 1: patience 2 stops after epoch 3
    monkeypatch.setattr(vae_train, "evaluate_vae", lambda *a, **k: {"val_bpd": 5.0})
    run_dir = train_vae(tiny_config(epochs=10, patience=2), [str(synth_dir)], tmp_path / "run")
    assert epochs_of(run_dir) == [1, 2, 3]
    assert torch.load(run_dir / "model.pt", weights_only=True)["epoch"] == 1  # best weights kept


@pytest.mark.usefixtures("no_plots")
def test_time_budget_stops_after_the_current_batch(synth_dir: Path, tmp_path: Path) -> None:
    run_dir = train_vae(tiny_config(epochs=10, max_minutes=0.0), [str(synth_dir)], tmp_path / "run")
    assert epochs_of(run_dir) == [1]
    # 16 frames in batches of 8: the budget cut the first epoch after one batch, and says so
    assert runs.read_history(run_dir)[0]["partial_epoch_frames"] == 8
    assert (run_dir / "model.pt").is_file()


@pytest.mark.usefixtures("no_plots")
def test_an_existing_run_is_not_overwritten_without_resume(
    synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    train_vae(tiny_config(epochs=1), [str(synth_dir)], out)
    code = main(["train", "vae", "--data", str(synth_dir), "--out", str(out), "--epochs", "1"])
    assert code == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "/no/such/folder"], "no such file"),
        ([], "--data"),
        (["--data", "{data}", "--set", "nonsense=1"], "KEY one of"),
        (["--data", "{data}", "--set", "latent_dim=abc"], "expected int"),
        (["--data", "{empty}"], "no frames found"),
        (["--data", "{data}", "--size", "250x141"], "divisible by 8"),
        (["--data", "{data}", "--size", "16x9"], "each side must be in 32..512"),
    ],
)
def test_user_errors_are_one_line_messages(
    argv: list[str], message: str, synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    argv = [a.format(data=synth_dir, empty=tmp_path / "empty") for a in argv]
    code = main(["train", "vae", "--out", str(tmp_path / "run"), "--device", "cpu", *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_gan_only_flags_are_refused_for_the_vae_and_vice_versa(
    synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "gan", "--data", str(synth_dir), "--out", str(tmp_path / "g"), "--beta", "2"])
    assert code == 2
    assert "--beta does not apply" in capsys.readouterr().err


def test_size_is_w_x_h_and_budgets_follow_it_where_not_given() -> None:
    import argparse

    from edgecase.commands.train import build_config
    from training.gan_train import GANConfig

    def config(*argv: str) -> VAEConfig:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        from edgecase.commands import train as train_command

        train_command.register(sub)
        return build_config(GANConfig if argv[1] == "gan" else VAEConfig, parser.parse_args(argv))

    wide = config("train", "vae", "--out", "x", "--size", "256x144")
    assert wide.size == "256x144" and wide.frame_size == (144, 256)
    assert (wide.max_minutes, wide.seg_steps) == (VAEConfig().max_minutes, VAEConfig().seg_steps)
    square = config("train", "gan", "--out", "x", "--size", "64")
    assert square.size == "64x64"
    assert (square.max_minutes, square.seg_steps, square.width) == (15.0, 2400, 32)  # 64x64's budgets
    given = config("train", "gan", "--out", "x", "--size", "64", "--max-minutes", "2", "--set", "width=8")
    assert (given.max_minutes, given.width) == (2.0, 8)  # what the user gives wins
    assert config("train", "vae", "--out", "x", "--set", "size=128x72").size == "128x72"
    from training.budgets import deferred_heads

    assert deferred_heads("256x144") == ("vae-iwae",) and deferred_heads(64) == ()


def test_a_gan_dry_run_at_a_wide_size_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "gan"
    argv = ["train", "gan", "--dry-run", "--size", "48x32", "--width", "4", "--latent-dim", "8"]
    assert main([*argv, "--device", "cpu", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["size"], config["width"]) == ("48x32", 4)
    model = torch.load(out / "model.pt", weights_only=True)
    assert model["state_dict"]["generator.net.0.weight"].shape[-2:] == (4, 6)  # the 4x6 core


def test_old_configs_with_an_int_size_still_load(tmp_path: Path) -> None:
    old = tiny_config(size=32)
    assert old.size == "32x32"
    assert VAEConfig.from_dict({"size": 64, "width": 4, "kind": "vae"}).size == "64x64"
    assert runs.run_size({"size": 64}) == (64, 64)
    assert runs.run_size({"size": "256x144"}) == (144, 256)


def test_help_shows_an_example() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgecase.cli", "train", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    assert "Example:" in proc.stdout and "edgecase train vae" in proc.stdout
