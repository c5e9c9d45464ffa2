"""The VAE network, its likelihood, the lossless coder and the four VAE score heads.

Networks are tiny (width 4, latent 8, 32 px) and untrained: these tests pin down shapes, units and
the inequalities that hold for any weights (IWAE <= ELBO, the likelihood sums to one).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from tests.training_helpers import assert_parity, road_frame
from training import runs
from training.complexity import ComplexityCoder, laplace_bits
from training.heads.vae import (
    VAE_HEADS,
    ELBOHead,
    IWAEHead,
    ReconHead,
    load_vae,
)
from training.pixels import to_unit_range
from training.vae import VAE, nats_to_bits_per_dim

HEADS = {spec.name: spec for spec in VAE_HEADS}

SIZE = 32


def tiny_vae(seed: int = 0, size: int = SIZE) -> VAE:
    torch.manual_seed(seed)
    return VAE(size=size, width=4, latent_dim=8).eval()


def road_frames(n: int, family: str = "normal", seed: int = 0, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([road_frame(rng, size, family) for _ in range(n)])


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory holding an untrained tiny VAE in model.pt, as train_vae writes it."""
    vae = tiny_vae()
    runs.save_model(tmp_path, "vae", {"kind": "vae", "size": SIZE}, vae.state_dict(), arch=vae.config())
    return tmp_path


@pytest.mark.parametrize("size", [32, 64, 128])
def test_network_shapes_for_each_size(size: int) -> None:
    vae = tiny_vae(size=size)
    x = torch.rand(2, 3, size, size) * 2 - 1
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (2, 8)
    assert vae.decode(mu).shape == (2, 3, size, size)
    assert vae.depth == int(math.log2(size // 4))  # down to 4x4


def test_sizes_the_network_cannot_take_are_refused() -> None:
    with pytest.raises(ValueError, match="32..512"):
        VAE(size=16)
    with pytest.raises(ValueError, match="divisible"):
        VAE(size=48, depth=5)
    with pytest.raises(ValueError, match="divisible by 8"):
        VAE(size="250x141")


def test_a_wide_vae_keeps_the_frames_aspect_down_to_its_core() -> None:
    vae = VAE(size="256x144", width=4, latent_dim=8).eval()
    assert (vae.depth, vae.bottom) == (4, (9, 16))
    assert vae.config()["size"] == "256x144"
    with torch.no_grad():
        recon, kl, mean = vae.elbo_terms(torch.zeros(2, 3, 144, 256), sample=False)
    assert mean.shape == (2, 3, 144, 256) and recon.shape == kl.shape == (2,)
    assert VAE(size=64, width=4, latent_dim=8).config()["size"] == 64  # square int runs rebuild as before


@pytest.mark.parametrize("log_scale", [math.log(0.3), math.log(0.05), -6.0])
def test_discretised_likelihood_sums_to_one_over_256_levels(log_scale: float) -> None:
    vae = tiny_vae()
    vae.log_scale.data.fill_(log_scale)
    levels = torch.arange(256, dtype=torch.float32) / 127.5 - 1  # every pixel value, as x
    x = levels.view(1, 1, 16, 16).expand(1, 3, 16, 16)
    for centre in (-1.0, -0.37, 0.0, 0.81, 1.0):
        mean = torch.full_like(x, centre)
        total = torch.exp(-vae.pixel_nll(x, mean)).sum(dim=(2, 3))
        assert torch.allclose(total, torch.ones_like(total), atol=1e-4)


def test_elbo_terms_are_positive_nats_and_bits_per_dim_convert() -> None:
    vae = tiny_vae()
    x = to_unit_range(torch.from_numpy(road_frames(4)))
    recon, kl, mean = vae.elbo_terms(x, sample=False)
    assert recon.shape == kl.shape == (4,)
    assert (recon > 0).all() and (kl >= 0).all()
    assert mean.shape == x.shape and mean.abs().max() <= 1
    bpd = nats_to_bits_per_dim(recon + kl, 3 * SIZE * SIZE)
    # an untrained model codes worse than 1 bit/dim but no worse than a few times uniform (8 bits)
    assert (bpd > 1).all() and (bpd < 40).all()


@pytest.mark.parametrize("head", sorted(HEADS))
def test_each_head_builds_from_the_run_dir_and_scores_any_batch(run_dir: Path, head: str) -> None:
    graph = HEADS[head].build(run_dir)
    frames = torch.from_numpy(road_frames(3))
    with torch.no_grad():
        out3 = graph(frames)
        out1 = graph(frames[:1])
    has_map = HEADS[head].has_map
    assert isinstance(out3, tuple) == has_map
    score3, score1 = (out3[0], out1[0]) if has_map else (out3, out1)
    assert score3.shape == (3,) and score3.dtype == torch.float32 and torch.isfinite(score3).all()
    # a frame's score does not depend on the rest of its batch (eval mode, fixed noise)
    assert torch.allclose(score1, score3[:1], rtol=1e-4, atol=1e-5)
    if has_map:
        assert out3[1].shape == (3, SIZE, SIZE) and out3[1].dtype == torch.float32


def test_heads_are_deterministic(run_dir: Path) -> None:
    frames = torch.from_numpy(road_frames(2))
    with torch.no_grad():
        a = HEADS["vae-iwae"].build(run_dir)(frames)
        b = HEADS["vae-iwae"].build(run_dir)(frames)
    assert torch.equal(a, b)


def test_elbo_head_map_sums_to_the_reconstruction_part_of_the_score() -> None:
    vae = tiny_vae()
    frames = torch.from_numpy(road_frames(2))
    with torch.no_grad():
        score, bits_map = ELBOHead(vae)(frames)
        mu, logvar = vae.encode(to_unit_range(frames))
        kl_bpd = nats_to_bits_per_dim(vae.kl(mu, logvar), 3 * SIZE * SIZE)
    recon_bpd = bits_map.flatten(1).sum(dim=1) / (3 * SIZE * SIZE)
    assert torch.allclose(score, recon_bpd + kl_bpd, rtol=1e-5)


def test_recon_head_score_is_the_mse_and_topk_is_larger() -> None:
    vae = tiny_vae()
    frames = torch.from_numpy(road_frames(2))
    with torch.no_grad():
        score, err_map = ReconHead(vae)(frames)
        x = to_unit_range(frames)
        mse = (x - vae.decode(vae.encode(x)[0])).pow(2).flatten(1).mean(dim=1)
        top, _ = ReconHead(vae, reduce="topk")(frames)
    assert torch.allclose(score, mse, rtol=1e-5)
    assert (top >= score).all()
    with pytest.raises(ValueError, match="reduce"):
        ReconHead(vae, reduce="max")


def sampled_neg_elbo_bpd(vae: VAE, frames: torch.Tensor, draws: int) -> torch.Tensor:
    """Monte-Carlo negative ELBO (z ~ q) in bits/dim, averaged over ``draws``."""
    x = to_unit_range(frames)
    total = torch.zeros(len(x))
    for _ in range(draws):
        recon, kl, _ = vae.elbo_terms(x, sample=True)
        total += recon + kl
    return nats_to_bits_per_dim(total / draws, x[0].numel())


def test_iwae_bound_is_below_the_elbo_and_tightens_with_k() -> None:
    torch.manual_seed(1)
    vae = tiny_vae()
    frames = torch.from_numpy(road_frames(4))
    with torch.no_grad():
        elbo = sampled_neg_elbo_bpd(vae, frames, draws=64)
        iwae = {k: IWAEHead(vae, samples=k)(frames) for k in (1, 4, 16, 64)}
    # K = 1 is the ELBO itself (one draw); more draws only lower the bound (Burda et al. 2016)
    assert abs(float(iwae[1].mean() - elbo.mean())) < 0.05 * float(elbo.mean())
    assert float(iwae[16].mean()) <= float(elbo.mean())
    assert float(iwae[64].mean()) <= float(iwae[16].mean()) <= float(iwae[4].mean())


def test_load_vae_refuses_another_kind_of_run(tmp_path: Path) -> None:
    runs.save_model(tmp_path, "gan", {}, {"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a VAE"):
        load_vae(tmp_path)


# --- the lossless coder behind vae-complexity (Serrà et al. 2020) ---------------------------------


def png_bits_per_dim(frame: np.ndarray) -> float:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", compress_level=9)
    return len(buf.getvalue()) * 8 / frame.size


def test_code_length_ranks_frames_like_png() -> None:
    frames = np.concatenate(
        [road_frames(12, "normal", 1, 64), road_frames(12, "fog", 2, 64), road_frames(12, "noise", 3, 64)]
    )
    coder_bits = ComplexityCoder(64)(torch.from_numpy(frames))[0].numpy()
    png_bits = np.array([png_bits_per_dim(f) for f in frames])
    assert spearmanr(coder_bits, png_bits).statistic > 0.8
    # and it is a real code length: within a factor of two of PNG on average
    assert 0.5 < coder_bits.mean() / png_bits.mean() < 2.0


def test_code_length_extremes() -> None:
    flat = np.full((1, 32, 32, 3), 77, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    bits, bits_map = ComplexityCoder(32)(torch.from_numpy(np.concatenate([flat, noise])))
    assert bits_map.shape == (2, 32, 32)
    assert float(bits[0]) < 0.2  # a flat frame costs almost nothing after the first pixel
    assert 7.5 < float(bits[1]) < 10.0  # uniform noise cannot be coded below 8 bits/dim


def test_discretised_laplace_is_a_distribution() -> None:
    r = torch.arange(-2000, 2001, dtype=torch.float32)
    for scale in (0.3, 2.0, 25.0):
        total = torch.exp2(-laplace_bits(r, torch.tensor(scale))).sum()
        assert abs(float(total) - 1.0) < 1e-3


def test_complexity_head_is_elbo_minus_code_length(run_dir: Path) -> None:
    frames = torch.from_numpy(road_frames(2))
    with torch.no_grad():
        elbo, elbo_map = HEADS["vae-elbo"].build(run_dir)(frames)
        score, diff_map = HEADS["vae-complexity"].build(run_dir)(frames)
        length, length_map = ComplexityCoder(SIZE)(frames)
    assert torch.allclose(score, elbo - length, rtol=1e-5, atol=1e-5)
    assert torch.allclose(diff_map, elbo_map - length_map, rtol=1e-5, atol=1e-4)


# --- export (the service runs these graphs in onnxruntime) ----------------------------------------


# dynamo=False (the TorchScript exporter) is what training/export uses: seconds instead of tens of
# seconds per graph; torch >= 2.9 flags it (and its logging setup) with DeprecationWarnings we expect.
@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
@pytest.mark.parametrize("head", sorted(HEADS))
def test_heads_export_to_onnx_with_a_dynamic_batch(run_dir: Path, tmp_path: Path, head: str) -> None:
    pytest.importorskip("onnxruntime")
    graph = HEADS[head].build(run_dir)
    has_map = HEADS[head].has_map
    frames = np.concatenate([road_frames(1, seed=11), road_frames(3, seed=13)])
    outputs = assert_parity(graph, frames, tmp_path / f"{head}.onnx", batches=(1, 4))
    assert outputs == (["score", "anomaly_map"] if has_map else ["score"])
