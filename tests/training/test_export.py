"""Export: what every published version holds, the checks that gate it, and how versions are numbered.

Fast tests export tiny torch modules that follow the score-graph contract (uint8 NHWC in, scaling
inside, `score` [N] and optionally `anomaly_map` [N, H, W] out). Real heads of dry-run VAE and GAN
runs are exported too: a few in the fast suite, every head in the slow one.
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from training_helpers import write_tiny_synth

from contract.manifest import ModelInfo, TrainingInfo, load_manifest
from service.registry import ModelRegistry
from training.calibrate import calibrate_scores
from training.export import export_graph, export_run, publish, recalibrate
from training.export_frames import perturbed_frames
from training.onnx_graph import (
    MIN_PARITY_EPS,
    ExportError,
    export_onnx,
    ort_session,
    parity_eps,
    rel_diff,
    run_ort,
    run_torch,
)

# torch >= 2.9 flags the TorchScript exporter (dynamo=False) as deprecated; it is the exporter we choose
# on purpose (seconds per graph, exact for these conv nets), so its DeprecationWarnings are expected.
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"
    ),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]

SIZE = 16


class TinyAutoencoder(nn.Module):
    """Reconstruction error of a two-conv autoencoder: score [N] and a per-pixel map [N, H, W]."""

    def __init__(self, with_map: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.dec = nn.Conv2d(8, 3, 3, padding=1)
        self.with_map = with_map

    def forward(self, frames: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = frames.permute(0, 3, 1, 2).float() / 127.5 - 1
        err = (x - torch.tanh(self.dec(torch.relu(self.enc(x))))).pow(2).mean(dim=1)
        score = err.mean(dim=(1, 2))
        return (score, err) if self.with_map else score


class BakesTheBatchSize(TinyAutoencoder):
    """A graph bug parity must catch: tracing turns the Python int batch size into a constant."""

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        score = super().forward(frames)[0]
        return score * float(frames.shape[0])


def normal_frames(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.full((n, SIZE, SIZE, 3), 110) + rng.integers(0, 30, (n, SIZE, SIZE, 3))).astype(np.uint8)


def export_tiny(repo: Path, graph: nn.Module | None = None, **kwargs: object) -> Path:
    normals = normal_frames(60)
    edges, families = perturbed_frames(normals, 20)
    options: dict = {
        "model": ModelInfo(kind="test", head="tiny", definition="reconstruction error", units="mse"),
        "size": SIZE,
        "normals": normals,
        "edges": edges,
        "families": families,
        "training": TrainingInfo(run_dir="none"),
        "calibration_source": ["memory"],
        **kwargs,
    }
    return export_graph(graph or TinyAutoencoder(), repo, str(options.pop("name", "tiny")), **options)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- what a published version is -----------------------------------------------------------------


def test_a_published_version_is_complete_and_loads_in_the_registry(tmp_path: Path) -> None:
    folder = export_tiny(tmp_path)
    assert folder == tmp_path / "tiny" / "1"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx"]
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == ["1"]  # no temp folder left behind
    manifest = load_manifest(folder)
    assert (manifest.name, manifest.version) == ("tiny", 1)
    assert manifest.input.frame_shape == (SIZE, SIZE, 3) and manifest.input.layout == "NHWC"
    assert manifest.output_names == ["score", "anomaly_map"]
    assert manifest.outputs[1].shape == ["N", SIZE, SIZE]
    assert manifest.export.opset == 17 and manifest.export.variant == "fp32"
    assert manifest.export.parity.batch_sizes == [1, 37] and manifest.export.parity.n_frames == 57
    assert manifest.export.parity.max_rel_diff <= 1e-4 == manifest.export.parity.tolerance
    assert manifest.files["model.onnx"].sha256 == sha256(folder / "model.onnx")
    assert manifest.evaluation is not None and manifest.evaluation["auroc"] > 0.9

    model = ModelRegistry(tmp_path).load("tiny")
    graph = TinyAutoencoder().eval()
    for n in (1, 37):
        frames = normal_frames(n, seed=n)
        got = model.score(frames)
        want = run_torch(graph, frames, batch_size=n)
        assert np.all(rel_diff(want["score"], got["score"]) <= 1e-4)
        np.testing.assert_allclose(got["anomaly_map"], want["anomaly_map"], rtol=1e-4, atol=1e-6)


def test_the_threshold_is_calibrated_with_onnxruntime_on_the_normals(tmp_path: Path) -> None:
    folder = export_tiny(tmp_path, target_fpr=0.05)
    manifest = load_manifest(folder)
    ort_scores = run_ort(ort_session(folder / "model.onnx"), normal_frames(60), 64)["score"]
    expected = calibrate_scores(ort_scores.astype(np.float64), target_fpr=0.05)
    assert manifest.threshold.value == expected.threshold
    assert manifest.threshold.calibrated_with == "onnxruntime" and manifest.threshold.target_fpr == 0.05
    assert manifest.calibration.n == 60 and manifest.calibration.exact
    assert manifest.calibration.scores == sorted(float(s) for s in ort_scores.astype(np.float64))
    assert (ort_scores > manifest.threshold.value).mean() <= 0.05


def test_a_score_only_graph_publishes_only_a_score_output(tmp_path: Path) -> None:
    folder = export_tiny(tmp_path, graph=TinyAutoencoder(with_map=False))
    assert load_manifest(folder).output_names == ["score"]
    assert set(ModelRegistry(tmp_path).load("tiny").score(normal_frames(2))) == {"score"}


# ---- versions ------------------------------------------------------------------------------------


def test_versions_count_up_and_a_published_version_is_never_modified(tmp_path: Path) -> None:
    first = export_tiny(tmp_path)
    before = {p.name: sha256(p) for p in first.iterdir()}
    assert export_tiny(tmp_path) == tmp_path / "tiny" / "2"
    (tmp_path / "tiny" / "7").mkdir()  # versions need not be contiguous
    assert export_tiny(tmp_path) == tmp_path / "tiny" / "8"
    with pytest.raises(ExportError, match="already exists; published versions are never modified"):
        export_tiny(tmp_path, version=1)
    assert {p.name: sha256(p) for p in first.iterdir()} == before
    assert all(not p.stat().st_mode & stat.S_IWUSR for p in first.iterdir())  # files are read-only
    assert ModelRegistry(tmp_path).scan() == {"tiny": [1, 2, 7, 8]}


def test_publish_takes_the_next_free_version_when_another_export_won_the_race(tmp_path: Path) -> None:
    first = export_tiny(tmp_path)
    manifest = load_manifest(first)
    tmp = tmp_path / "tiny" / ".tmp-racer"
    tmp.mkdir()
    (tmp / "model.onnx").write_bytes((first / "model.onnx").read_bytes())
    (tmp_path / "tiny" / "2").mkdir()  # someone else is publishing 2 right now
    (tmp_path / "tiny" / "2" / "model.onnx").write_bytes(b"theirs")
    assert publish(tmp, tmp_path / "tiny", manifest) == tmp_path / "tiny" / "3"
    assert load_manifest(tmp_path / "tiny" / "3").version == 3


def test_a_failed_check_publishes_nothing(tmp_path: Path) -> None:
    # The tracer warns that the batch size became a constant: exactly the bug this test plants.
    with (
        pytest.warns(torch.jit.TracerWarning),
        pytest.raises(ExportError, match="torch vs onnxruntime scores differ"),
    ):
        export_tiny(tmp_path, graph=BakesTheBatchSize())
    assert list(tmp_path.iterdir()) == []  # not even an empty model folder
    assert ModelRegistry(tmp_path).scan() == {}


def test_a_failed_export_keeps_the_versions_already_published(tmp_path: Path) -> None:
    export_tiny(tmp_path)
    with pytest.warns(torch.jit.TracerWarning), pytest.raises(ExportError):
        export_tiny(tmp_path, graph=BakesTheBatchSize())
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == ["1"]


def test_export_refuses_empty_frame_sets(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="need normal and edge-case frames"):
        export_tiny(tmp_path, edges=normal_frames(0), families=[])


# ---- parity definition ---------------------------------------------------------------------------


def test_relative_difference_is_relative_above_eps_and_absolute_below() -> None:
    np.testing.assert_allclose(rel_diff([100.01, -2.0], [100.0, -2.0]), [1e-4 / 1.0001, 0.0])
    np.testing.assert_allclose(rel_diff([0.0], [1e-7], eps=1e-3), [1e-4])
    assert parity_eps([5000.0, 5000.1, 5000.2]) == 5000.1  # ELBO-sized: the typical |score|
    assert parity_eps([0.0, 0.0]) == MIN_PARITY_EPS
    # z-score combinations centre on zero: the scale is their spread (10 x IQR), not their size.
    z = np.random.default_rng(0).normal(size=400)
    iqr = float(np.subtract(*np.percentile(z, [75, 25])))
    assert parity_eps(z) == pytest.approx(10 * iqr)
    # float32 rounding of a score near zero passes; a real divergence (a tenth of the spread) does not.
    assert rel_diff([0.002], [0.002 + 3e-5], eps=parity_eps(z)).max() < 1e-4
    assert rel_diff([0.5], [0.5 + 0.1 * iqr], eps=parity_eps(z)).max() > 1e-4


class Expm1Graph(nn.Module):
    """expm1 of fixed arguments spanning its hard cases (tiny, large negative, overflow) per frame."""

    ARGS = (-200.0, -50.0, -1.0, -1e-3, -1e-6, -1e-9, 0.0, 1e-9, 1e-6, 1e-3, 1.0, 50.0, 100.0)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("args", torch.tensor(self.ARGS))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        ones = frames.float()[:, 0, 0, 0] * 0 + 1
        return torch.expm1(ones[:, None] * self.args[None, :])


def test_expm1_exports_to_onnx_without_losing_small_arguments(tmp_path: Path) -> None:
    # ONNX has no Expm1; exp(x) - 1 would give 0 for x = 1e-9 and 1.19e-7 for 1e-7.
    path = tmp_path / "expm1.onnx"
    assert export_onnx(Expm1Graph().eval(), path, SIZE)[1] == "torch.onnx.export(dynamo=False)"
    got = ort_session(path).run(None, {"frames": normal_frames(1)})[0][0]
    want = torch.expm1(torch.tensor(Expm1Graph.ARGS)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)


# ---- recalibration -------------------------------------------------------------------------------


def test_calibrate_publishes_a_new_version_with_the_same_graph(tmp_path: Path) -> None:
    first = export_tiny(tmp_path)
    data = write_tiny_synth(tmp_path / "normals", size=SIZE, n_train=10, n_val=5, n_test=4)
    second = recalibrate(first, data, target_fpr=0.1)
    assert second == tmp_path / "tiny" / "2"
    old, new = load_manifest(first), load_manifest(second)
    assert new.files == old.files and sha256(second / "model.onnx") == sha256(first / "model.onnx")
    assert new.export.derived_from == "tiny/1" and new.threshold.target_fpr == 0.1
    assert new.calibration.n == 10 + 5 + 4  # every normal frame of the folder; the fog frames are skipped
    assert new.calibration.data == [str(data)]
    assert new.threshold.value != old.threshold.value
    assert ModelRegistry(tmp_path).load("tiny").version == 2


def test_calibrate_refuses_a_graph_that_does_not_match_its_manifest(tmp_path: Path) -> None:
    first = export_tiny(tmp_path)
    model = first / "model.onnx"
    model.chmod(0o644)
    model.write_bytes(model.read_bytes()[:-10])
    with pytest.raises(ExportError, match="does not match its manifest"):
        recalibrate(first, write_tiny_synth(tmp_path / "normals", size=SIZE))
    assert ModelRegistry(tmp_path).scan() == {"tiny": [1]}


# ---- variants ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["fp16", "int8"])
def test_variants_keep_the_interface_and_record_their_difference(tmp_path: Path, variant: str) -> None:
    folder = export_tiny(tmp_path, variant=variant, name=f"tiny-{variant}")
    manifest = load_manifest(folder)
    assert manifest.export.variant == variant and manifest.export.parity.tolerance is None
    assert 0 < manifest.export.parity.max_rel_diff < 0.05
    model = ModelRegistry(tmp_path).load(f"tiny-{variant}")  # uint8 in, float32 out, like fp32
    assert model.score(normal_frames(3))["score"].dtype == np.float32


# ---- real heads of dry-run runs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_synth(tmp_path_factory.mktemp("data") / "synth", size=32, n_train=16, n_val=6, n_test=4)


@pytest.fixture(scope="module")
def seeded_run(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int], Path]:
    """``seeded_run(kind, seed)``: a dry-run run of that kind and seed, trained once per module."""
    made: dict[tuple[str, int], Path] = {}

    def get(kind: str, seed: int) -> Path:
        if (kind, seed) not in made:
            out = tmp_path_factory.mktemp("runs") / kind
            if kind == "vae":
                from training.vae_train import VAEConfig, train_vae

                vae = VAEConfig(size=32, dry_run=True, epochs=1, calibrate=False, seed=seed)
                made[kind, seed] = Path(train_vae(vae, [str(synth_data)], out))
            else:
                from training.gan_train import GANConfig, train_gan

                gan = GANConfig(size=32, dry_run=True, epochs=1, seed=seed)
                made[kind, seed] = Path(train_gan(gan, [str(synth_data)], out))
        return made[kind, seed]

    return get


@pytest.fixture(scope="module")
def vae_run(seeded_run: Callable[[str, int], Path]) -> Path:
    return seeded_run("vae", 0)


@pytest.fixture
def runs(request: pytest.FixtureRequest, seeded_run: Callable[[str, int], Path]) -> dict[str, Path]:
    """The dry-run run of the test's `kind` (and `seed`, default 0) only (each takes ~10-20 s to train)."""
    params = request.node.callspec.params
    kind = params["kind"]
    return {kind: seeded_run(kind, params.get("seed", 0))}


# Every head a run of each kind offers (the test below checks this list is complete).
HEADS = {
    "vae": ["vae-elbo", "vae-recon", "vae-iwae", "vae-complexity", "vae-patch", "vae-seg", "vae-combo"],
    "gan": ["gan-disc", "gan-feat", "gan-dfeat-knn", "gan-patch", "gan-seg", "gan-combo"],
}
# The fast suite exports one head of a VAE run; every other head (and the GAN run) is in -m slow.
FAST_HEADS = {("vae-elbo", 0)}
ALL_HEADS = [(kind, head) for kind, heads in HEADS.items() for head in heads]


@pytest.mark.parametrize("kind", [pytest.param("vae"), pytest.param("gan", marks=pytest.mark.slow)])
def test_the_head_list_covers_every_head_of_a_run(runs: dict[str, Path], kind: str) -> None:
    from training.heads import available_heads

    assert sorted(available_heads(runs[kind])) == sorted(HEADS[kind])


@pytest.mark.parametrize(
    ("kind", "head", "seed"),
    [
        pytest.param(
            k, h, seed, marks=() if (h, seed) in FAST_HEADS else pytest.mark.slow, id=f"{h}-seed{seed}"
        )
        for k, h in ALL_HEADS
        for seed in (0, 1)  # two differently seeded runs: a head must not export only by luck
    ],
)
def test_every_head_exports_passes_parity_and_loads(
    runs: dict[str, Path], tmp_path: Path, kind: str, head: str, seed: int
) -> None:
    folder = export_run(runs[kind], head, tmp_path)
    manifest = load_manifest(folder)
    assert manifest.name == head and manifest.model.head == head and manifest.model.kind == kind
    assert manifest.export.parity.max_rel_diff <= 1e-4
    assert (
        manifest.training.data_fingerprint
        == json.loads((runs[kind] / "config.json").read_text())["data_fingerprint"]
    )
    assert "fog" in manifest.evaluation["auroc_by_family"]  # edge cases came from the labelled test split
    model = ModelRegistry(tmp_path).load(head)
    assert model.score(np.zeros((37, 32, 32, 3), np.uint8))["score"].shape == (37,)


def test_the_export_command_publishes_and_calibrate_republishes(vae_run: Path, tmp_path: Path) -> None:
    from edgecase.cli import main

    repo = tmp_path / "models"
    assert main(["export", str(vae_run), "--head", "vae-elbo", "--repo", str(repo), "--name", "v"]) == 0
    data = write_tiny_synth(tmp_path / "normals", size=32)
    assert main(["calibrate", str(repo / "v" / "1"), "--data", str(data), "--target-fpr", "0.2"]) == 0
    assert ModelRegistry(repo).scan() == {"v": [1, 2]}
    assert main(["export", str(tmp_path), "--head", "vae-elbo", "--repo", str(repo)]) == 2  # not a run
    assert main(["export", str(vae_run), "--head", "nope", "--repo", str(repo)]) == 2  # unknown head


def test_export_without_a_head_publishes_the_runs_best_head(vae_run: Path, tmp_path: Path) -> None:
    from edgecase.cli import main

    assert main(["export", str(vae_run), "--repo", str(tmp_path), "--name", "best"]) == 0
    assert load_manifest(tmp_path / "best" / "1").model.head == "vae-seg"
