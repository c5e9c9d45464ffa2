"""The DCGAN: networks, losses, stabilisers, the training run, and the GAN score heads.

Tiny sizes throughout (32x32 frames, width 8) so the whole module runs in seconds on a shared CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import Image
from torch import nn
from training_helpers import assert_parity

from training import gan_train
from training.dcgan import (
    DCGAN,
    Discriminator,
    Encoder,
    Generator,
    fold_spectral_norm,
    num_stages,
    recalibrate_batchnorm,
)
from training.gan_metrics import frechet_distance, mean_pairwise_distance
from training.gan_steps import discriminator_loss, gan_step, generator_loss, r1_penalty
from training.gan_train import GANConfig, train_gan
from training.heads.gan import (
    GAN_HEADS,
    DFeatKnnGraph,
    FeatResidualGraph,
    load_dfeat_bank,
    load_gan,
)

HEADS = {spec.name: spec for spec in GAN_HEADS}

SIZE = 32
WIDTH = 8


def road_frame(rng: np.random.Generator, size: int = SIZE) -> npt.NDArray[np.uint8]:
    """Sky over road with a lane line and noise: enough structure for a GAN to have something to learn."""
    y = np.linspace(0, 1, size)[:, None, None]
    sky = rng.uniform(120, 230, 3) * (1 - 0.3 * y)
    img = np.where(y < rng.uniform(0.35, 0.55), sky, np.array([90.0, 90.0, 95.0])) * np.ones((size, size, 3))
    img[int(size * 0.6) :, size // 2 - 1 : size // 2 + 1] = 240
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def frame_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unlabelled folder of 40 small road frames (the loader splits it into train and val)."""
    out = tmp_path_factory.mktemp("gan_frames")
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(road_frame(rng)).save(out / f"frame_{i:03d}.png")
    return out


def tiny_config(**overrides: object) -> GANConfig:
    values: dict[str, object] = {
        "size": SIZE,
        "width": WIDTH,
        "latent_dim": 16,
        "batch_size": 8,
        "device": "cpu",
        "dry_run": True,
        "bank_size": 64,
        "max_minutes": None,
    }
    values.update(overrides)
    return GANConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def dry_run_dir(tmp_path_factory: pytest.TempPathFactory, frame_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("gan_run") / "run"
    return train_gan(tiny_config(stabiliser="spectral+r1", r1_every=1), [str(frame_dir)], out)


# -- networks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("norm", ["batch", "spectral"])
def test_networks_map_between_latents_images_and_logits_at_every_size(size: int, norm: str) -> None:
    G, D, E = Generator(size, 16, WIDTH), Discriminator(size, WIDTH, norm), Encoder(size, 16, WIDTH)
    images = G(torch.randn(2, 16))
    assert images.shape == (2, 3, size, size)
    assert images.abs().max() <= 1.0  # Tanh output, paired with x / 127.5 - 1 inputs
    assert D(images).shape == (2,)
    assert E(images).shape == (2, 16)
    feats = D.features(images)
    assert len(feats) == num_stages(size) == int(math.log2(size)) - 2
    assert [f.shape[-1] for f in feats] == [size // 2 ** (i + 1) for i in range(len(feats))]
    assert feats[-1].shape[-1] == 4


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (16, "each side must be in 32..512"),
        (1024, "each side must be in 32..512"),
        ("250x141", "divisible by 8"),
        ("64x36", "divisible by 8"),  # 36 halves only twice
        (64.0, "size must be N"),
    ],
)
def test_sizes_the_networks_cannot_take_are_refused_with_the_reason(size: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Generator(size)


@pytest.mark.parametrize(
    ("size", "core"), [(64, (4, 4)), ("256x144", (9, 16)), ("48x32", (4, 6)), (48, (6, 6))]
)
def test_wide_frames_have_a_wide_core(size: object, core: tuple[int, int]) -> None:
    from training.dcgan import DCGAN, core_size

    assert core_size(size) == core
    model = DCGAN(size, latent_dim=8, width=4).eval()
    h, w = core[0] * 2 ** num_stages(size), core[1] * 2 ** num_stages(size)
    with torch.no_grad():
        fake = model.generator(torch.randn(2, 8))
        assert fake.shape == (2, 3, h, w)
        assert model.discriminator(fake).shape == (2,)
        assert model.encoder(fake).shape == (2, 8)


def test_spectral_norm_discriminator_has_no_batch_norm_and_unit_spectral_norm_weights() -> None:
    D = Discriminator(SIZE, WIDTH, "spectral")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in D.modules())
    x = torch.randn(4, 3, SIZE, SIZE)
    for _ in range(30):  # power iteration converges in train mode
        D(x)
    D.eval()
    weight = D.body.stages[1][0].weight
    assert torch.linalg.matrix_norm(weight.flatten(1), ord=2).item() == pytest.approx(1.0, abs=0.05)
    before = D(x)
    fold_spectral_norm(D)
    assert not any(hasattr(m, "parametrizations") for m in D.modules())
    torch.testing.assert_close(D(x), before)


def test_batch_norm_discriminator_has_batch_norm() -> None:
    assert any(isinstance(m, nn.BatchNorm2d) for m in Discriminator(SIZE, WIDTH, "batch").modules())
    with pytest.raises(ValueError, match="norm"):
        Discriminator(SIZE, WIDTH, "layer")


def test_recalibrated_batch_norm_holds_the_exact_statistics_of_the_batches() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    batches = [torch.randn(5, 3, 6, 6) + i for i in range(3)]
    recalibrate_batchnorm(net, batches)
    conv_out = torch.cat([net[0](b) for b in batches])
    # Equal-sized batches: the mean of per-batch means is the overall mean.
    torch.testing.assert_close(net[1].running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    assert net[1].momentum == 0.1  # restored afterwards


# -- losses and stabilisers -----------------------------------------------------------------------


def test_non_saturating_generator_loss_is_minus_log_d_of_g_of_z() -> None:
    torch.manual_seed(0)
    G, D = Generator(SIZE, 16, WIDTH), Discriminator(SIZE, WIDTH)
    logits = D(G(torch.randn(6, 16)))
    expected = -torch.log(torch.sigmoid(logits)).mean()
    torch.testing.assert_close(generator_loss(logits), expected, rtol=1e-6, atol=1e-6)
    # It stays finite where the naive form underflows: D rejecting a fake with logit -200.
    assert generator_loss(torch.tensor([-200.0])).item() == pytest.approx(200.0)


def test_discriminator_loss_is_binary_cross_entropy_with_one_sided_smoothing() -> None:
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    plain = -(torch.log(d_real).mean() + torch.log(1 - d_fake).mean())
    torch.testing.assert_close(discriminator_loss(real, fake), plain)
    smooth = -((0.9 * torch.log(d_real) + 0.1 * torch.log(1 - d_real)).mean() + torch.log(1 - d_fake).mean())
    torch.testing.assert_close(discriminator_loss(real, fake, real_target=0.9), smooth)


def test_r1_penalty_is_the_squared_input_gradient_norm() -> None:
    w = torch.randn(3, 4, 4)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (x * w).flatten(1).sum(1)  # a linear "D": its input gradient is w for every frame
    assert r1_penalty(logits, x).item() == pytest.approx(w.pow(2).sum().item(), rel=1e-5)


def _step(cfg: GANConfig, step: int = 0) -> tuple[dict[str, float], DCGAN, DCGAN]:
    torch.manual_seed(0)
    model = DCGAN(SIZE, cfg.latent_dim, WIDTH, "spectral" if "spectral" in cfg.stabilisers() else "batch")
    before = DCGAN(SIZE, cfg.latent_dim, WIDTH, "spectral" if "spectral" in cfg.stabilisers() else "batch")
    before.load_state_dict(model.state_dict())
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    real = torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    stats = gan_step(model.generator, model.discriminator, opt_g, opt_d, real, cfg, step)
    return stats, model, before


@pytest.mark.parametrize("stabiliser", ["none", "spectral", "r1", "label-smoothing", "spectral+r1"])
def test_one_training_step_changes_both_networks(stabiliser: str) -> None:
    stats, model, before = _step(tiny_config(stabiliser=stabiliser))
    assert all(math.isfinite(v) for v in stats.values())
    for name in ("generator", "discriminator"):
        after_params = dict(getattr(model, name).named_parameters())
        changed = [
            n for n, p in getattr(before, name).named_parameters() if not torch.equal(p, after_params[n])
        ]
        assert changed, f"{name} did not change"


def test_r1_switch_applies_the_penalty_lazily_every_r1_every_steps() -> None:
    assert "r1" not in _step(tiny_config(stabiliser="spectral"))[0]
    assert "r1" in _step(tiny_config(stabiliser="r1", r1_every=4), step=8)[0]
    assert "r1" not in _step(tiny_config(stabiliser="r1", r1_every=4), step=9)[0]


@pytest.mark.parametrize("spec", ["", "dropout", "none+r1", "spectral+bogus"])
def test_unknown_or_contradictory_stabilisers_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="stabiliser"):
        tiny_config(stabiliser=spec).validate()


def test_diversity_is_zero_for_identical_frames_and_positive_otherwise() -> None:
    same = torch.ones(4, 3, 8, 8)
    assert mean_pairwise_distance(same) == 0.0
    # Two frames at -1 and +1 everywhere: RMS difference per value is 2.
    assert mean_pairwise_distance(torch.stack([-same[0], same[0]])) == pytest.approx(2.0)


def test_frechet_distance_matches_the_closed_form() -> None:
    a = np.random.default_rng(0).normal(size=(500, 4)) @ np.diag([1.0, 2.0, 0.5, 1.5])
    shift = np.array([1.0, -2.0, 0.0, 3.0])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # Same covariance: only the means differ.
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # Scaled by 2: covariance 4S, so Tr(S + 4S - 2 * 2S) = Tr(S), plus the mean term.
    expected = np.trace(np.cov(a, rowvar=False)) + float((a.mean(0) ** 2).sum())
    assert frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="same d"):
        frechet_distance(a, a[:, :3])


# -- the training run ---------------------------------------------------------------------------


def test_dry_run_writes_model_plots_history_with_diversity_and_bank(dry_run_dir: Path) -> None:
    for name in ["config.json", "checkpoint.pt", "model.pt", "history.jsonl", "banks/dfeat.pt"]:
        assert (dry_run_dir / name).is_file(), name
    for name in ["loss.png", "samples.png", "samples_epoch_001.png", "reconstructions.png"]:
        assert (dry_run_dir / "plots" / name).is_file(), name
    records = [json.loads(line) for line in (dry_run_dir / "history.jsonl").read_text().splitlines()]
    gan = [r for r in records if r["phase"] == "gan"]
    assert len(gan) == 1 and [r["phase"] for r in records] == ["gan", "encoder"]
    assert gan[0]["diversity_ratio"] == pytest.approx(gan[0]["diversity_fake"] / gan[0]["diversity_real"])
    assert gan[0]["diversity_real"] > 0 and "train_r1" in gan[0] and "val_d_loss" in gan[0]
    assert gan[0]["fd_pixels"] > gan[0]["fd_pixels_floor"] >= 0  # an untrained G is far from real
    config = json.loads((dry_run_dir / "config.json").read_text())
    assert config["kind"] == "gan" and config["d_norm"] == "spectral" and config["encoder_trained"]
    assert config["stabilisers"] == ["r1", "spectral"] and len(config["data_fingerprint"]) == 64
    assert load_dfeat_bank(dry_run_dir).shape[0] == config["n_train"]


def test_dry_run_without_data_uses_noise_frames(tmp_path: Path) -> None:
    run_dir = train_gan(tiny_config(), [], tmp_path / "run")
    assert (run_dir / "model.pt").is_file()


def test_an_existing_run_is_not_overwritten(dry_run_dir: Path, frame_dir: Path) -> None:
    with pytest.raises(ValueError, match="already holds a run"):
        train_gan(tiny_config(), [str(frame_dir)], dry_run_dir)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]


def test_same_seed_same_weights_and_resume_continues_exactly(
    tmp_path: Path, frame_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = {"dry_run": False, "epochs": 2, "encoder_epochs": 1, "batch_size": 16}
    straight = train_gan(tiny_config(**cfg), [str(frame_dir)], tmp_path / "straight")

    # Interrupt the second run after epoch 2 is logged but before its checkpoint is written.
    real_plot = gan_train._plot_history

    def crash_in_epoch_two(run_dir: Path, history: list[dict[str, object]]) -> None:
        real_plot(run_dir, history)
        if len(history) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(gan_train, "_plot_history", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_gan(tiny_config(**cfg), [str(frame_dir)], tmp_path / "resumed")
    monkeypatch.setattr(gan_train, "_plot_history", real_plot)
    resumed = train_gan(tiny_config(**cfg), [str(frame_dir)], tmp_path / "resumed", resume=True)

    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (resumed / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 1]


# -- score heads --------------------------------------------------------------------------------


def random_frames(n: int, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8))


def test_every_head_is_described() -> None:
    assert set(HEADS) == {"gan-disc", "gan-feat", "gan-dfeat-knn"}
    for spec in HEADS.values():
        assert spec.kind == "gan" and spec.units and spec.definition and isinstance(spec.has_map, bool)


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("batch", [1, 3])
def test_heads_score_uint8_frames_with_the_documented_outputs(
    dry_run_dir: Path, head: str, batch: int
) -> None:
    graph = HEADS[head].build(dry_run_dir)
    assert not graph.training
    with torch.no_grad():
        out = graph(random_frames(batch))
    if HEADS[head].has_map:
        score, amap = out
        assert amap.shape == (batch, SIZE, SIZE) and amap.dtype == torch.float32
    else:
        score = out
    assert score.shape == (batch,) and score.dtype == torch.float32 and torch.isfinite(score).all()


def test_heads_score_each_frame_independently_of_its_batch(dry_run_dir: Path) -> None:
    frames = random_frames(3)
    for head, build in ((name, spec.build) for name, spec in HEADS.items()):
        graph = build(dry_run_dir)
        with torch.no_grad():
            together = graph(frames)
            alone = graph(frames[1:2])
        together = together[0] if isinstance(together, tuple) else together
        alone = alone[0] if isinstance(alone, tuple) else alone
        torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-6, msg=head)


def test_gan_disc_is_minus_log_d(dry_run_dir: Path) -> None:
    model, _ = load_gan(dry_run_dir)
    frames = random_frames(2)
    with torch.no_grad():
        d = torch.sigmoid(model.discriminator(frames.permute(0, 3, 1, 2).float() / 127.5 - 1))
        torch.testing.assert_close(HEADS["gan-disc"].build(dry_run_dir)(frames), -torch.log(d))


def test_gan_feat_pixel_part_is_the_mean_of_its_map(dry_run_dir: Path) -> None:
    model, _ = load_gan(dry_run_dir)
    graph = FeatResidualGraph(model.generator, model.discriminator, model.encoder, kappa=0.0)
    with torch.no_grad():
        score, amap = graph(random_frames(2))
    torch.testing.assert_close(score, amap.mean(dim=(1, 2)) / 3)


def test_dfeat_knn_scores_a_bank_frame_at_distance_zero(dry_run_dir: Path, frame_dir: Path) -> None:
    model, _ = load_gan(dry_run_dir)
    frames = torch.from_numpy(
        np.stack([np.asarray(Image.open(p)) for p in sorted(frame_dir.glob("*.png"))[:4]])
    )
    from training.heads.gan import compute_dfeat_bank

    bank = compute_dfeat_bank(model.discriminator, frames.numpy())
    graph = DFeatKnnGraph(model.discriminator, bank, k=1).eval()
    with torch.no_grad():
        assert graph(frames).abs().max().item() < 1e-5
        assert (graph(random_frames(4)) > 1e-3).all()
    assert DFeatKnnGraph(model.discriminator, bank, k=50).k == 4  # k never exceeds the bank


# The legacy TorchScript exporter (dynamo=False) is deprecated but is the fast, exact one for conv nets;
# it also calls a typing_extensions-deprecated helper internally ("The feature will be removed").
@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
@pytest.mark.parametrize("head", sorted(HEADS))
def test_heads_export_to_onnx_and_onnxruntime_agrees(dry_run_dir: Path, tmp_path: Path, head: str) -> None:
    pytest.importorskip("onnxruntime")
    graph = HEADS[head].build(dry_run_dir)
    has_map = HEADS[head].has_map
    frames = random_frames(5, seed=7).numpy()  # another batch size than traced
    names = assert_parity(graph, frames, tmp_path / f"{head}.onnx")
    assert names == (["score", "anomaly_map"] if has_map else ["score"])


def test_building_knn_head_without_bank_is_a_clear_error(dry_run_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(dry_run_dir, copy)
    (copy / "banks" / "dfeat.pt").unlink()
    with pytest.raises(FileNotFoundError, match="D-feature bank"):
        HEADS["gan-dfeat-knn"].build(copy)
