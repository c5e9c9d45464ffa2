"""The score-head registry, the position-aware patch head and the combined head.

Graphs take uint8 NHWC frames and return a score [N] (and an anomaly map [N, H, W]); the local and
combined heads must export to ONNX (opset 17, dynamic batch) and agree with onnxruntime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from eval_helpers import edge_frames, normal_frames, write_labelled_folder, write_tiny_gan_run  # noqa: E402
from torch import nn  # noqa: E402
from training_helpers import assert_parity  # noqa: E402

from training.heads import (  # noqa: E402
    available_heads,
    build_score_graph,
    default_head,
    default_head_of,
    head_info,
)
from training.heads.combo import ComboGraph  # noqa: E402
from training.heads.patch import PatchDistanceGraph, cell_statistics  # noqa: E402
from training.patch_bank import (  # noqa: E402
    PatchFeatures,
    build_bank,
    context_backbone,
    early_layers,
    greedy_coreset,
    sample_candidates,
)
from training.protocol import (  # noqa: E402
    MIN_GAIN,
    beyond_noise,
    choose_rule,
    combine,
    detection_at_threshold,
    difference_noise,
    preferred,
    protocol_score,
    pseudo_anomalies,
    pseudo_auroc,
    rule_score,
    select_components,
)


def write_config(run_dir: Path, kind: str) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"kind": kind, "size": 32}))
    return run_dir


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gan")
    data = write_labelled_folder(root / "data")
    return write_tiny_gan_run(root / "run", data)


def tiny_patch_graph(
    train: np.ndarray, bank_size: int = 16, held_out: np.ndarray | None = None
) -> PatchDistanceGraph:
    """A patch graph on a one-conv backbone; with ``held_out`` normals, per-cell normalised."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2))
    features = PatchFeatures(backbone, channels=8, dim=8)
    bank, grid = build_bank(features, train, bank_size=bank_size, radius=1)
    graph = PatchDistanceGraph(features, bank, grid).eval()
    if held_out is None:
        return graph
    return PatchDistanceGraph(features, bank, grid, *cell_statistics(graph, held_out)).eval()


# -- registry ----------------------------------------------------------------------------------------


def test_registry_lists_the_heads_of_the_runs_kind(tmp_path: Path) -> None:
    vae = available_heads(write_config(tmp_path / "v", "vae"))
    gan = available_heads(write_config(tmp_path / "g", "gan"))
    assert {"vae-elbo", "vae-recon", "vae-iwae", "vae-complexity", "vae-patch", "vae-combo"} <= set(vae)
    assert {"gan-disc", "gan-feat", "gan-patch", "gan-combo"} <= set(gan)
    assert not any(h.startswith("gan-") for h in vae) and not any(h.startswith("vae-") for h in gan)


def test_unknown_head_is_rejected_with_the_valid_names(gan_run: Path) -> None:
    with pytest.raises(ValueError, match="unknown score head 'vae-elbo'.*valid: .*gan-disc"):
        build_score_graph(gan_run, "vae-elbo")
    with pytest.raises(ValueError, match="unknown score head 'nope'"):
        head_info("nope")


def test_a_folder_without_a_run_or_with_a_strange_kind_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        available_heads(tmp_path)
    with pytest.raises(ValueError, match="unknown run kind 'diffusion'"):
        available_heads(write_config(tmp_path / "d", "diffusion"))


def test_head_info_describes_each_head() -> None:
    patch = head_info("gan-patch")
    assert patch.kind == "gan" and patch.has_map and "nearest-neighbour" in patch.definition
    assert head_info("vae-elbo").kind == "vae"
    assert callable(head_info("vae-combo").build) and callable(head_info("vae-combo").fit)


def test_the_default_head_of_each_kind_is_a_registered_head(tmp_path: Path) -> None:
    for kind in ("vae", "gan"):
        assert default_head(kind) in available_heads(write_config(tmp_path / kind, kind))
    with pytest.raises(ValueError, match="unknown run kind"):
        default_head("flow")


def test_a_run_without_the_best_head_defaults_to_the_next_best_it_has(tmp_path: Path) -> None:
    run = write_config(tmp_path / "vae", "vae")
    assert default_head_of(run) == default_head("vae") == "vae-seg"
    (run / "config.json").write_text(json.dumps({"kind": "vae", "size": 32, "seg_steps": 0}))  # no seg
    assert default_head_of(run) == "vae-combo"


# -- patch head --------------------------------------------------------------------------------------


def test_greedy_coreset_covers_every_cluster() -> None:
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2) for c in centres])[None]  # one location
    chosen = points[0, greedy_coreset(points, 3)[0]]
    nearest = torch.cdist(centres, chosen).min(dim=1).values
    assert torch.all(nearest < 1.0)


def test_early_layers_stop_before_the_next_conv() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 3)
    )
    layers, channels = early_layers(net, 2)
    assert channels == 6 and len(layers) == 5
    with pytest.raises(ValueError, match="only 3 conv layers"):
        early_layers(net, 4)


def test_bank_candidates_of_a_location_are_its_own_and_its_neighbours_features() -> None:
    feats = torch.randn(3, 5, 4, 6)  # [N, D, h, w]
    padded = torch.nn.functional.pad(feats, (1, 1, 1, 1), mode="replicate")
    keep = torch.arange(3 * 9)
    got = sample_candidates(padded, torch.arange(24), 6, keep, radius=1)  # [L, K, D]
    assert got.shape == (24, 27, 5)
    for loc in (0, 7, 23):  # a corner, an inner location, the opposite corner
        i, j = divmod(loc, 6)
        want = [
            feats[n, :, min(max(i + di, 0), 3), min(max(j + dj, 0), 5)]
            for n in range(3)
            for di in (-1, 0, 1)
            for dj in (-1, 0, 1)
        ]
        torch.testing.assert_close(got[loc], torch.stack(want))
    subset = torch.tensor([4, 13, 26])  # a random draw keeps the same (frame, shift) pairs everywhere
    torch.testing.assert_close(sample_candidates(padded, torch.arange(24), 6, subset, 1), got[:, subset])


def test_context_features_join_the_next_blocks_output_at_the_first_grid() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(4, 6, 4, 2, 1),
        nn.BatchNorm2d(6),
        nn.LeakyReLU(0.2),
    ).eval()
    plain, channels = context_backbone(net, 1, 0)
    assert channels == 4 and isinstance(plain, nn.Sequential)
    joined, channels = context_backbone(net, 1, 1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = joined(x)
        assert out.shape == (2, 10, 16, 16) and channels == 10
        torch.testing.assert_close(out[:, :4], plain(x))
        deeper = nn.functional.interpolate(net(x), size=(16, 16), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[:, 4:], deeper)


def test_patch_head_with_context_exports_and_matches_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 8, 4, 2, 1), nn.LeakyReLU(0.2)
    )
    backbone, channels = context_backbone(net, 1, 1)
    features = PatchFeatures(backbone, channels=channels, dim=8)
    bank, grid = build_bank(features, normal_frames(24, seed=3), bank_size=16, radius=1, max_candidates=100)
    assert bank.shape == (16 * 16, 16, 8)
    graph = PatchDistanceGraph(features, bank, grid).eval()
    assert_parity(graph, edge_frames("blob", 5, seed=7), tmp_path / "graph.onnx", batches=(1, 5))


def test_patch_head_finds_a_small_object_and_maps_where_it_is() -> None:
    train = normal_frames(40, seed=3)
    graph = tiny_patch_graph(train)
    normal = normal_frames(12, seed=4)
    blobs = edge_frames("blob", 12, seed=5)
    with torch.no_grad():
        s_normal, _ = graph(torch.from_numpy(normal))
        s_blob, maps = graph(torch.from_numpy(blobs))
    assert s_blob.min() > s_normal.max()  # a 4-pixel square among 1024 pixels is found every time
    assert maps.shape == (12, 32, 32)
    peak_rows, peak_cols = np.unravel_index(maps.flatten(1).argmax(1).numpy(), (32, 32))
    for frame, r, c in zip(blobs, peak_rows, peak_cols, strict=True):
        magenta = np.argwhere((frame == (255, 0, 255)).all(-1))
        assert np.abs(magenta - (r, c)).max(axis=1).min() <= 3


def test_patch_head_is_position_aware() -> None:
    """Road-grey in the sky is anomalous although road-grey is normal lower down."""
    train = normal_frames(40, seed=3)
    graph = tiny_patch_graph(train)
    odd = normal_frames(8, seed=6)
    odd[:, 2:8, 10:18] = odd[:, 26:32, 10:18]  # a patch of road pasted into the sky
    with torch.no_grad():
        s_normal, _ = graph(torch.from_numpy(normal_frames(8, seed=4)))
        s_odd, _ = graph(torch.from_numpy(odd))
    assert s_odd.min() > s_normal.max()


def test_patch_head_exports_and_matches_onnxruntime(tmp_path: Path) -> None:
    graph = tiny_patch_graph(normal_frames(24, seed=3))
    assert_parity(graph, edge_frames("blob", 5, seed=7), tmp_path / "graph.onnx", batches=(1, 5))


def with_busy_corner(frames: np.ndarray, seed: int) -> np.ndarray:
    """Normal frames whose top-left 8x8 corner is loud noise in every frame (a flickering sign)."""
    frames = frames.copy()
    frames[:, :8, :8] = np.random.default_rng(seed).integers(0, 256, (len(frames), 8, 8, 3), dtype=np.uint8)
    return frames


def test_per_cell_normalisation_lets_a_faint_object_stand_out_from_a_busy_region() -> None:
    """Raw distances: the noisy corner swamps the max. Per cell: each location is judged by its own spread."""
    train = with_busy_corner(normal_frames(40, seed=3), seed=1)
    held_out = with_busy_corner(normal_frames(40, seed=8), seed=2)
    normal = with_busy_corner(normal_frames(12, seed=4), seed=3)
    faint = normal.copy()
    rng = np.random.default_rng(5)
    for frame in faint:  # a 4x4 square of lighter grey on the road (road is 90, the square 130)
        y, x = int(rng.integers(19, 28)), int(rng.integers(8, 28))
        frame[y : y + 4, x : x + 4] = 130
    raw, per_cell = tiny_patch_graph(train), tiny_patch_graph(train, held_out=held_out)
    with torch.no_grad():
        raw_normal, raw_faint = raw(torch.from_numpy(normal))[0], raw(torch.from_numpy(faint))[0]
        cell_normal, cell_faint = per_cell(torch.from_numpy(normal))[0], per_cell(torch.from_numpy(faint))[0]
    assert raw_faint.min() <= raw_normal.max()  # the failure the normalisation exists for
    assert cell_faint.min() > 2 * cell_normal.max()


def test_per_cell_statistics_centre_held_out_normals() -> None:
    train, held_out = normal_frames(40, seed=3), normal_frames(60, seed=8)
    graph = tiny_patch_graph(train, held_out=held_out)
    with torch.no_grad():
        _, maps = graph(torch.from_numpy(held_out))
        zmap = graph.distance_map(torch.from_numpy(held_out))
    z = (zmap - graph.cell_center) * graph.inv_cell_scale
    assert z.median(dim=0).values.abs().max() < 1e-5
    assert maps.shape == (60, 32, 32)


def test_per_cell_normalised_patch_head_exports_and_matches_onnxruntime(tmp_path: Path) -> None:
    graph = tiny_patch_graph(normal_frames(24, seed=3), held_out=normal_frames(16, seed=8))
    assert_parity(graph, edge_frames("blob", 5, seed=7), tmp_path / "graph.onnx", batches=(1, 5))


def test_run_patch_head_caches_its_bank(gan_run: Path) -> None:
    graph = build_score_graph(gan_run, "gan-patch")
    bank = gan_run / "banks" / "gan-patch.pt"
    assert bank.is_file()
    again = build_score_graph(gan_run, "gan-patch")
    frames = torch.from_numpy(normal_frames(3, seed=9))
    with torch.no_grad():
        torch.testing.assert_close(graph(frames), again(frames))


# -- combined head -----------------------------------------------------------------------------------


class Constant(nn.Module):
    """A toy head: score = mean pixel value times a factor (plus a map when asked)."""

    def __init__(self, factor: float, with_map: bool = False) -> None:
        super().__init__()
        self.factor, self.with_map = factor, with_map

    def forward(self, frames: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = frames.float()
        score = x.mean(dim=(1, 2, 3)) * self.factor
        return (score, x.mean(dim=3) * self.factor) if self.with_map else score


def test_combine_rules() -> None:
    z = np.array([[1.0, 3.0, 2.0], [0.0, -1.0, 0.5]])
    np.testing.assert_allclose(combine(z, "max"), [3.0, 0.5])
    np.testing.assert_allclose(combine(z, "mean"), [2.0, -0.5 / 3])
    np.testing.assert_allclose(combine(z, "top2"), [2.5, 0.25])
    np.testing.assert_allclose(combine(torch.tensor(z), "top2").numpy(), [2.5, 0.25])
    with pytest.raises(ValueError, match="unknown combination rule"):
        combine(z, "median")


def test_rule_selection_prefers_max_when_one_head_sees_each_anomaly() -> None:
    rng = np.random.default_rng(0)
    normal = rng.normal(size=(1000, 2))
    pseudo = rng.normal(size=(1000, 2))
    pseudo[:500, 0] += 4  # half the anomalies only head 0 sees, half only head 1
    pseudo[500:, 1] += 4
    rule, by_rule, per_component = choose_rule(normal, pseudo)
    assert rule == "max" and by_rule["max"] > by_rule["mean"] + MIN_GAIN
    assert len(per_component) == 2


def test_a_rule_that_wins_by_less_than_its_noise_gives_way_to_mean() -> None:
    """At 1% FPR on 300 normals the threshold is the third-highest normal: a gap of 0.07 is noise."""
    rng = np.random.default_rng(1)
    normal, pseudo = rng.normal(size=(300, 2)), rng.normal(size=(300, 2))
    pseudo[:150, 0] += 4
    pseudo[150:, 1] += 4
    rule, by_rule, _ = choose_rule(normal, pseudo)
    gap = by_rule["max"] - by_rule["mean"]
    noise = difference_noise(normal, pseudo, ([0, 1], "mean"), ([0, 1], "max"))
    assert gap > MIN_GAIN and not beyond_noise(gap, noise) and rule == "mean"


def test_the_protocol_score_is_the_mean_of_auroc_and_detection_and_matches_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    normal = rng.integers(0, 50, 500).astype(float)  # ties on purpose
    corrupted = rng.integers(20, 80, 300).astype(float)
    auroc = roc_auc_score(np.r_[np.zeros(500), np.ones(300)], np.r_[normal, corrupted])
    expected = (auroc + detection_at_threshold(normal, corrupted)) / 2
    assert protocol_score(normal, corrupted) == pytest.approx(expected, abs=1e-12)


def test_corruption_groups_weigh_equally_whatever_their_sizes() -> None:
    normal = np.arange(1000, dtype=np.float64)
    local = np.full(900, 5000.0)  # every local corruption caught
    global_ = np.full(100, -1.0)  # every global one missed (below all normals)
    corrupted, groups = np.r_[local, global_], np.r_[["patch"] * 900, ["global"] * 100]
    assert protocol_score(normal, corrupted) == pytest.approx((0.9 + 0.9) / 2)  # frames weigh
    assert protocol_score(normal, corrupted, groups=groups) == pytest.approx(0.5)  # groups weigh
    with pytest.raises(ValueError, match="group labels"):
        protocol_score(normal, corrupted, groups=groups[:10])


def test_the_protocol_weighs_detection_at_the_threshold_not_only_the_ranking() -> None:
    normal = np.arange(1000, dtype=np.float64)  # the 1% threshold is 989
    bulk = np.full(100, 800.0)  # all above 80% of normals, none above the threshold
    tail = np.r_[np.full(60, 2000.0), np.full(40, -1.0)]  # 60% far out, 40% below every normal
    assert detection_at_threshold(normal, bulk) == 0.0 and detection_at_threshold(normal, tail) == 0.6
    # AUROC ranks the bulk higher (0.80 vs 0.60); at the operating point the tail catches 60%.
    assert protocol_score(normal, tail) > protocol_score(normal, bulk)
    assert protocol_score(normal, tail) == pytest.approx((0.6 + 0.6) / 2)


def test_rules_within_the_noise_of_the_best_tie_and_the_tie_goes_to_fewer_components_then_mean() -> None:
    assert preferred({"max": (0.950, 2), "mean": (0.947, 2), "top2": (0.900, 2)}) == "mean"
    assert preferred({"max": (0.950, 2), "mean": (0.940, 2), "top2": (0.900, 2)}) == "max"
    assert preferred({"max": (0.950, 1), "mean": (0.952, 3), "top2": (0.951, 2)}) == "max"
    # The same gap of 0.01 is a tie when its standard error is 0.01 (2 SE = 0.02).
    assert preferred({"max": (0.950, 2), "mean": (0.940, 2), "top2": (0.900, 2)}, {"mean": 0.01}) == "mean"


def test_selection_keeps_complementary_heads_by_max_and_drops_noise() -> None:
    rng = np.random.default_rng(1)
    normal, pseudo = rng.normal(size=(1000, 4)), rng.normal(size=(1000, 4))
    pseudo[:500, 0] += 4  # heads 0 and 1 each see half of the anomalies
    pseudo[500:, 1] += 4
    normal[:, 2] = normal[:, 0] + 0.05 * rng.normal(size=1000)  # head 2: a near-copy of head 0
    pseudo[:, 2] = pseudo[:, 0] + 0.05 * rng.normal(size=1000)  # head 3 stays noise
    rule, chosen, by_rule = select_components(normal, pseudo)
    assert rule == "max" and 1 in chosen and 3 not in chosen
    assert len({0, 2} & set(chosen)) >= 1  # at least one of the two copies
    assert set(by_rule) == {"max", "mean", "top2"} and by_rule[rule] == max(by_rule.values())


def test_selection_finds_a_mean_of_several_heads_that_adding_one_at_a_time_would_not() -> None:
    """Head 0 sees the anomalies best; 1-3 weakly. Any pair is no better than head 0 alone (the second
    head dilutes it), the mean of all four is clearly better: a greedy search stops at head 0."""
    rng = np.random.default_rng(1)
    normal, pseudo = rng.normal(size=(2000, 5)), rng.normal(size=(2000, 5))
    pseudo[:, 0] += 3
    pseudo[:, 1:4] += 1.2  # head 4 stays noise
    single = rule_score(normal[:, [0]], pseudo[:, [0]], "mean")
    assert (
        max(rule_score(normal[:, [0, k]], pseudo[:, [0, k]], "mean") for k in (1, 2, 3)) < single + MIN_GAIN
    )
    rule, chosen, _ = select_components(normal, pseudo)
    assert rule == "mean" and sorted(chosen) == [0, 1, 2, 3] and chosen[0] == 0


def test_pseudo_anomalies_change_a_patch_of_each_frame() -> None:
    frames = normal_frames(20, seed=1)
    out = pseudo_anomalies(frames, normal_frames(5, seed=2), seed=0)
    changed = (out != frames).any(-1).sum(axis=(1, 2))
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert (changed > 0).sum() >= 18 and changed.max() < 32 * 32 / 2


def test_validation_protocol_ranks_a_local_head_above_a_global_one() -> None:
    """The protocol (normals vs pseudo-anomalies) is how head settings are chosen: it must discriminate."""
    val = normal_frames(60, seed=8)
    local = pseudo_auroc(tiny_patch_graph(normal_frames(40, seed=3), held_out=normal_frames(30, seed=9)), val)
    brightness = pseudo_auroc(Constant(1.0), val)
    assert local > 0.8
    assert local > brightness + 0.1


def test_combo_graph_standardises_and_combines(tmp_path: Path) -> None:
    combo = ComboGraph([Constant(1.0), Constant(2.0, with_map=True)], [10.0, 20.0], [2.0, 4.0], "mean")
    frames = torch.full((3, 4, 4, 3), 14, dtype=torch.uint8)
    score, amap = combo(frames)
    torch.testing.assert_close(score, torch.full((3,), 2.0))  # z = (14-10)/2 = 2 and (28-20)/4 = 2
    assert amap.shape == (3, 4, 4)
    both = [Constant(1.0, with_map=True), Constant(2.0, with_map=True)]
    _, amap = ComboGraph(both, [0.0, 0.0], [1.0, 1.0], "max", map_from=1)(frames)
    torch.testing.assert_close(amap, torch.full((3, 4, 4), 28.0))  # the second component's map
    with pytest.raises(ValueError, match="one center and one scale"):
        ComboGraph([Constant(1.0)], [0.0, 1.0], [1.0], "max")


def test_run_combo_head_builds_records_its_choice_and_exports(gan_run: Path, tmp_path: Path) -> None:
    graph = build_score_graph(gan_run, "gan-combo")
    record = json.loads((gan_run / "banks" / "gan-combo.json").read_text())
    assert record["rule"] in ("max", "mean", "top2") and "gan-patch" in record["components"]
    assert set(record["pseudo_auroc_by_rule"]) == {"max", "mean", "top2"}
    assert_parity(graph, edge_frames("fog", 5, seed=8), tmp_path / "graph.onnx", batches=(1, 5))


def test_combo_statistics_are_recomputed_when_a_component_changes(gan_run: Path) -> None:
    """Stale z-score statistics would silently mis-scale a rebuilt patch bank."""
    build_score_graph(gan_run, "gan-combo")
    cache = gan_run / "banks" / "gan-combo.json"
    record = json.loads(cache.read_text())
    record["fingerprint"], record["center"] = "stale", [c + 100.0 for c in record["center"]]
    cache.write_text(json.dumps(record))
    rebuilt = build_score_graph(gan_run, "gan-combo")
    assert json.loads(cache.read_text())["fingerprint"] != "stale"
    assert rebuilt.center.max() < max(record["center"]) - 50
