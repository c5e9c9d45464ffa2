"""Each rule both halves depend on has one owner, and every caller goes through it.

The rules: the conformal p-value, the calibration quantiles (inverted CDF, as models/README.md
promises), the version-folder rule, the onnxruntime session settings, the verdict (p-value and flag)
of a score, and the pixel scaling. The last test searches the tree so a second copy cannot creep
back in unnoticed.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from contract.manifest import Manifest, conformal_p_values, is_edge_case, quantiles_of
from contract.repository import list_versions, next_version

ROOT = Path(__file__).resolve().parents[2]


def make_manifest(tmp_path: Path, scores: list[float], threshold: float) -> Manifest:
    """A valid manifest over a stand-in model file (only its calibration matters here)."""
    pytest.importorskip("onnx")
    from service_helpers import manifest_for

    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read")
    return manifest_for("m", 1, model, size=8, threshold=threshold, with_map=False, calibration=scores)


# ---- p-values --------------------------------------------------------------------------------------


def test_p_value_is_one_plus_the_count_of_calibration_scores_at_least_as_high_over_n_plus_one() -> None:
    got = conformal_p_values([0.0, 2.0, 2.5, 4.0, 9.0], [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(got, [5 / 5, 4 / 5, 3 / 5, 2 / 5, 1 / 5])  # ties count as "at least"


def test_p_value_does_not_depend_on_the_order_of_calibration_scores() -> None:
    rng = np.random.default_rng(0)
    calibration = rng.normal(size=500)
    scores = rng.normal(size=50)
    brute = [(1 + np.sum(calibration >= s)) / 501 for s in scores]
    np.testing.assert_allclose(conformal_p_values(scores, rng.permutation(calibration)), brute)


def test_p_values_of_fresh_normals_are_uniform_enough() -> None:
    rng = np.random.default_rng(1)
    p = conformal_p_values(rng.normal(size=20000), rng.normal(size=999))
    assert abs(np.mean(p <= 0.05) - 0.05) < 0.01  # valid: P(p <= a) ~ a for exchangeable frames


def test_p_values_of_thinned_scores_scale_the_count_to_n() -> None:
    stored = [1.0, 2.0, 3.0]  # every 10th of 30 scores
    got = conformal_p_values([3.0, 0.0], stored, n=30)
    np.testing.assert_allclose(got, [(1 + 1 * 10) / 31, (1 + 30) / 31])


def test_p_values_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="finite"):
        conformal_p_values([np.inf], [1.0])
    with pytest.raises(ValueError, match="calibration scores must be finite"):
        conformal_p_values([1.0], [1.0, np.nan])
    with pytest.raises(ValueError, match="at least one"):
        conformal_p_values([1.0], [])


def test_the_manifest_gives_the_same_p_values_as_the_rule(tmp_path: Path) -> None:
    scores = [float(s) for s in np.linspace(0.0, 1.0, 21)]
    manifest = make_manifest(tmp_path, scores, threshold=0.9)
    probe = np.array([-1.0, 0.25, 0.9, 0.95, 2.0])
    np.testing.assert_array_equal(manifest.p_values(probe), conformal_p_values(probe, scores))


# ---- verdicts --------------------------------------------------------------------------------------


def test_a_verdict_is_the_p_value_and_the_strict_flag_at_the_manifests_threshold(tmp_path: Path) -> None:
    scores = [float(s) for s in np.linspace(0.0, 1.0, 11)]
    manifest = make_manifest(tmp_path, scores, threshold=0.9)
    probe = np.array([0.5, 0.9, 0.9000001, 3.0])
    p_values, flags = manifest.verdicts(probe)
    np.testing.assert_array_equal(p_values, manifest.p_values(probe))
    assert flags.tolist() == [False, False, True, True]  # strictly above: 0.9 itself is normal
    np.testing.assert_array_equal(flags, is_edge_case(probe, 0.9))


# ---- quantiles -------------------------------------------------------------------------------------


def test_quantiles_are_inverted_cdf_so_each_is_a_calibration_score() -> None:
    scores = np.arange(1.0, 11.0)  # 1..10
    q = quantiles_of(scores, levels=(0.5, 0.9, 0.95, 0.99))
    # inverted CDF: the smallest score t with #{c <= t} >= q n; linear interpolation would give 5.5, 9.1...
    assert q == {"0.5": 5.0, "0.9": 9.0, "0.95": 10.0, "0.99": 10.0}
    assert set(q.values()) <= set(scores.tolist())


def test_training_calibration_stores_the_contract_quantiles() -> None:
    pytest.importorskip("torch")
    from training.calibrate import calibrate_scores

    scores = np.random.default_rng(3).normal(size=101)
    assert calibrate_scores(scores).quantiles == quantiles_of(scores)


# ---- the version-folder rule -----------------------------------------------------------------------


def test_versions_are_positive_integer_folders_and_the_next_is_one_more(tmp_path: Path) -> None:
    model = tmp_path / "vae-elbo"
    assert list_versions(model) == [] and next_version(model) == 1
    for name in ("1", "3", "10", "0", ".tmp-abc", "notes", "2.bak"):
        (model / name).mkdir(parents=True)
    (model / "7").write_text("a file, not a version")
    assert list_versions(model) == [1, 3, 10]
    assert next_version(model) == 11


def test_export_and_the_registry_use_the_one_rule() -> None:
    pytest.importorskip("onnxruntime")
    import contract.repository
    import service.registry

    assert service.registry.list_versions is contract.repository.list_versions
    pytest.importorskip("torch")
    import training.export

    assert training.export.next_version is contract.repository.next_version


# ---- onnxruntime sessions --------------------------------------------------------------------------


def _tiny_onnx(path: Path) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["N", 2])
    y = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 2])
    graph = helper.make_graph([helper.make_node("Relu", ["frames"], ["score"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_export_and_service_open_sessions_with_the_same_settings(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from service.registry import make_session
    from training.onnx_graph import ort_session

    path = _tiny_onnx(tmp_path / "model.onnx")
    served = make_session(path, ["CPUExecutionProvider"], intra_op_threads=1).get_session_options()
    exported = ort_session(path, intra_op_threads=1).get_session_options()
    for options in (served, exported):
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
        assert options.intra_op_num_threads == 1
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


# ---- one definition of each rule in the tree -------------------------------------------------------


def _constant(value: float) -> Callable[[ast.AST], bool]:
    return lambda node: isinstance(node, ast.Constant) and node.value == value


def _call(attribute: str) -> Callable[[ast.AST], bool]:
    def match(node: ast.AST) -> bool:
        func = getattr(node, "func", None)
        return isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr == attribute

    return match


def _name_isdigit(node: ast.AST) -> bool:
    """``<something>.name.isdigit()``: a folder name read as a number."""
    func = getattr(node, "func", None)
    return (
        isinstance(node, ast.Call)
        and isinstance(func, ast.Attribute)
        and func.attr == "isdigit"
        and isinstance(func.value, ast.Attribute)
        and func.value.attr == "name"
    )


def _p_value_count(node: ast.AST) -> bool:
    """A function named like a p-value that counts calibration scores (``searchsorted``)."""
    return (
        isinstance(node, ast.FunctionDef)
        and "p_value" in node.name
        and any(_call("searchsorted")(inner) for inner in ast.walk(node))
    )


# rule -> (what its code looks like, the one module allowed to have it)
RULES = {
    "pixel scaling": (_constant(127.5), "training/pixels.py"),
    "conformal p-value": (_p_value_count, "contract/manifest.py"),
    "quantile": (_call("quantile"), "contract/manifest.py"),
    "version folder": (_name_isdigit, "contract/repository.py"),
    "session options": (_call("SessionOptions"), "contract/sessions.py"),
}


# Code that looks like a rule but is something else, each with the reason (kept short on purpose).
NOT_THE_RULE = {
    "quantile": {
        "service/drift.py": "PSI bin edges: equal-mass deciles of the calibration scores (linear)",
        "service/report_figures.py": "a histogram's axis limits",
    },
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_the_tree_has_one_copy_of_each_rule(rule: str) -> None:
    matches, owner = RULES[rule]
    found = []
    for folder in ("contract", "training", "service", "edgecase", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            if any(matches(node) for node in ast.walk(tree)):
                found.append(str(path.relative_to(ROOT)))
    exempt = NOT_THE_RULE.get(rule, {})
    assert [path for path in found if path not in exempt] == [owner]
    assert set(exempt) <= set(found), "an exemption for code that is gone: remove it"
