"""The service's model registry: which versions it sees, what it refuses, and how it reloads.

Graphs here are tiny ONNX graphs built with onnx.helper (mean brightness as the score), so these tests
need no torch, like the service itself.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from contract.manifest import Manifest, file_entry, quantiles_of
from contract.repository import list_versions
from contract.sessions import default_providers
from service import registry as registry_module
from service.registry import ModelLoadError, ModelRegistry

SIZE = 8


def tiny_graph(
    size: int = SIZE,
    with_map: bool = True,
    input_dtype: int = TensorProto.UINT8,
    batch: int | str = "N",
) -> onnx.ModelProto:
    """score = mean pixel value; anomaly_map = mean over channels. Same contract as a real score graph."""
    nodes = [
        helper.make_node("Cast", ["frames"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["score"], axes=[1, 2, 3], keepdims=0),
    ]
    outputs = [helper.make_tensor_value_info("score", TensorProto.FLOAT, [batch])]
    if with_map:
        nodes.append(helper.make_node("ReduceMean", ["x"], ["anomaly_map"], axes=[3], keepdims=0))
        outputs.append(helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [batch, size, size]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("frames", input_dtype, [batch, size, size, 3])],
        outputs,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def publish(
    repo: Path,
    name: str,
    version: int,
    graph: onnx.ModelProto | None = None,
    size: int = SIZE,
    with_map: bool = True,
) -> Path:
    """Write a version folder the way export does (graph, then a manifest with its hash)."""
    folder = repo / name / str(version)
    folder.mkdir(parents=True)
    onnx.save(graph if graph is not None else tiny_graph(SIZE, with_map), folder / "model.onnx")
    scores = [float(s) for s in np.linspace(0, 255, 101)]
    outputs = [{"name": "score", "shape": ["N"]}]
    if with_map:
        outputs.append({"name": "anomaly_map", "shape": ["N", size, size]})
    manifest = Manifest.model_validate(
        {
            "name": name,
            "version": version,
            "created_at": "2026-01-01T00:00:00Z",
            "model": {"kind": "test", "head": "mean", "definition": "mean pixel value", "units": "grey"},
            "input": {"height": size, "width": size},
            "outputs": outputs,
            "threshold": {"value": 252.45, "target_fpr": 0.01, "calibration_n": len(scores)},
            "calibration": {"n": len(scores), "quantiles": quantiles_of(scores), "scores": scores},
            "training": {"run_dir": "none"},
            "export": {
                "opset": 17,
                "exporter": "onnx.helper",
                "torch_version": "-",
                "onnx_version": onnx.__version__,
                "onnxruntime_version": "-",
                "parity": {"max_rel_diff": 0.0, "eps": 1e-6, "n_frames": 1},
            },
            "files": {"model.onnx": file_entry(folder / "model.onnx").model_dump()},
        }
    )
    manifest.write(folder / "manifest.json")
    return folder


def frames(n: int, value: int = 100) -> np.ndarray:
    return np.full((n, SIZE, SIZE, 3), value, dtype=np.uint8)


def test_scan_lists_integer_versions_and_ignores_temp_and_other_folders(tmp_path: Path) -> None:
    publish(tmp_path, "a", 1)
    publish(tmp_path, "a", 10)
    publish(tmp_path, "a", 2)
    (tmp_path / "a" / ".tmp-export-123").mkdir()  # an export still being written
    (tmp_path / "a" / "latest").mkdir()
    (tmp_path / "a" / "0").mkdir()
    (tmp_path / ".cache" / "1").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    registry = ModelRegistry(tmp_path)
    assert registry.scan() == {"a": [1, 2, 10]}
    assert registry.latest_versions() == {"a": 10}
    assert list_versions(tmp_path / "missing") == []


def test_load_serves_the_highest_version_and_scores_a_batch(tmp_path: Path) -> None:
    publish(tmp_path, "m", 1)
    publish(tmp_path, "m", 2)
    model = ModelRegistry(tmp_path).load("m")
    assert (model.name, model.version) == ("m", 2)
    assert model.providers == ["CPUExecutionProvider"]
    out = model.score(frames(3, 200))
    assert set(out) == {"score", "anomaly_map"}
    np.testing.assert_allclose(out["score"], [200.0] * 3)
    assert out["anomaly_map"].shape == (3, SIZE, SIZE)
    assert model.threshold == pytest.approx(252.45)
    np.testing.assert_allclose(model.manifest.p_values([255.0, -1.0]), [2 / 102, 1.0])


def test_score_refuses_wrong_dtype_or_shape(tmp_path: Path) -> None:
    publish(tmp_path, "m", 1)
    model = ModelRegistry(tmp_path).load("m")
    with pytest.raises(ValueError, match="uint8"):
        model.score(frames(1).astype(np.float32))
    with pytest.raises(ValueError, match=r"\[N, 8, 8, 3\]"):
        model.score(np.zeros((1, 3, SIZE, SIZE), dtype=np.uint8))


def test_a_truncated_model_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = publish(tmp_path, "m", 1)
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ModelLoadError, match=r"model\.onnx: size \d+ bytes, manifest says \d+ \(truncated"
    ) as info:
        ModelRegistry(tmp_path).load("m", 1)
    assert str(folder / "model.onnx") in str(info.value)


def test_a_flipped_byte_is_refused_as_a_hash_mismatch(tmp_path: Path) -> None:
    folder = publish(tmp_path, "m", 1)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"model\.onnx: sha256 .* does not match"):
        ModelRegistry(tmp_path).load("m", 1)


def test_a_missing_graph_file_is_refused(tmp_path: Path) -> None:
    folder = publish(tmp_path, "m", 1)
    (folder / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match=r"model\.onnx: listed in the manifest but missing"):
        ModelRegistry(tmp_path).load("m", 1)


def test_a_manifest_whose_input_size_disagrees_with_the_graph_is_refused(tmp_path: Path) -> None:
    publish(tmp_path, "m", 1, graph=tiny_graph(size=16))  # the manifest says 8x8
    with pytest.raises(
        ModelLoadError, match=r"graph input frames are \[16, 16, 3\].*manifest says \[8, 8, 3\]"
    ):
        ModelRegistry(tmp_path).load("m", 1)


def test_a_map_not_declared_at_the_inputs_height_and_width_is_refused(tmp_path: Path) -> None:
    # /score?maps=true promises the model input's full resolution: a graph whose map axes are symbolic
    # passes the graph check, so the manifest's declared shape is what must say [N, H, W].
    graph = tiny_graph()
    for axis, name in ((1, "H"), (2, "W")):
        graph.graph.output[1].type.tensor_type.shape.dim[axis].dim_param = name
    folder = publish(tmp_path, "m", 1, graph=graph)
    data = json.loads((folder / "manifest.json").read_text())
    data["outputs"][1]["shape"] = ["N", 4, 4]
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=r"anomaly_map is \['N', 4, 4\]; a map is \[N, 8, 8\]"):
        ModelRegistry(tmp_path).load("m", 1)
    data["outputs"][1]["shape"] = ["N", SIZE, SIZE]
    (folder / "manifest.json").write_text(json.dumps(data))
    assert ModelRegistry(tmp_path).load("m", 1).score(frames(2))["anomaly_map"].shape == (2, SIZE, SIZE)


def test_a_graph_missing_a_manifest_output_is_refused(tmp_path: Path) -> None:
    publish(tmp_path, "m", 1, graph=tiny_graph(with_map=False))  # the manifest lists anomaly_map
    with pytest.raises(ModelLoadError, match=r"model\.onnx: graph has no output 'anomaly_map'"):
        ModelRegistry(tmp_path).load("m", 1)


def test_a_graph_with_outputs_the_manifest_does_not_list_is_refused(tmp_path: Path) -> None:
    publish(tmp_path, "m", 1, graph=tiny_graph(with_map=True), with_map=False)
    with pytest.raises(ModelLoadError, match="outputs the manifest does not list: \\['anomaly_map'\\]"):
        ModelRegistry(tmp_path).load("m", 1)


def test_a_float_input_or_fixed_batch_is_refused(tmp_path: Path) -> None:
    publish(tmp_path, "f", 1, graph=tiny_graph(input_dtype=TensorProto.FLOAT))
    publish(tmp_path, "b", 1, graph=tiny_graph(batch=4))
    registry = ModelRegistry(tmp_path)
    with pytest.raises(ModelLoadError, match=r"graph input is tensor\(float\), manifest says uint8"):
        registry.load("f", 1)
    with pytest.raises(ModelLoadError, match="fixed batch size 4"):
        registry.load("b", 1)


def test_a_manifest_that_does_not_match_its_folder_is_refused(tmp_path: Path) -> None:
    folder = publish(tmp_path, "m", 1)
    folder.rename(tmp_path / "m" / "3")
    with pytest.raises(ModelLoadError, match="manifest says m/1 but the folder is m/3"):
        ModelRegistry(tmp_path).load("m", 3)


def test_a_broken_manifest_is_refused_naming_it(tmp_path: Path) -> None:
    folder = publish(tmp_path, "m", 1)
    data = json.loads((folder / "manifest.json").read_text())
    del data["threshold"]
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=r"manifest\.json: invalid manifest: threshold: Field required"):
        ModelRegistry(tmp_path).load("m", 1)


def test_unknown_names_and_versions_are_refused(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    with pytest.raises(ModelLoadError, match="no published version"):
        registry.load("nobody")
    publish(tmp_path, "m", 1)
    with pytest.raises(ModelLoadError, match="no such model version"):
        registry.load("m", 7)


def test_load_skips_a_broken_newest_version_and_serves_the_previous(tmp_path: Path) -> None:
    publish(tmp_path, "m", 1)
    broken = publish(tmp_path, "m", 2)
    (broken / "model.onnx").write_bytes(b"garbage")
    registry = ModelRegistry(tmp_path)
    assert registry.load("m").version == 1
    assert "m/2" in registry.failures


def test_load_newest_finds_only_versions_above_the_one_given(tmp_path: Path) -> None:
    publish(tmp_path, "m", 1)
    registry = ModelRegistry(tmp_path)
    old = registry.load("m")
    publish(tmp_path, "m", 2)
    model, refused = registry.load_newest("m", newer_than=1)
    assert model is not None and model.version == 2 and refused == {}
    assert registry.load_newest("m", newer_than=2) == (None, {})  # nothing new
    np.testing.assert_allclose(old.score(frames(1, 7))["score"], [7.0])  # an in-flight holder still works


def test_a_refused_version_is_skipped_until_its_files_change_or_a_retry_is_asked(tmp_path: Path) -> None:
    publish(tmp_path, "m", 1)
    broken = publish(tmp_path, "m", 2, graph=tiny_graph(size=16))
    registry = ModelRegistry(tmp_path)
    model, refused = registry.load_newest("m", newer_than=1)
    assert model is None and "graph input frames" in refused["m/2"]
    assert registry.load_newest("m", newer_than=1) == (None, {})  # unchanged: not rebuilt, not reported
    assert "m/2" in registry.failures
    # Asked to retry (POST /admin/reload): tried again; the same reason is not reported twice.
    assert registry.load_newest("m", newer_than=1, retry_refused=True) == (None, {})
    # The files change (a copy that was still in progress completes): tried again on its own.
    shutil.rmtree(broken)
    publish(tmp_path, "m", 2)
    model, refused = registry.load_newest("m", newer_than=1)
    assert refused == {} and model is not None and model.version == 2
    assert "m/2" not in registry.failures


def test_provider_choice_prefers_cuda_and_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        registry_module.ort,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(registry_module.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert default_providers() == ["CPUExecutionProvider"]


def test_a_provider_override_this_build_lacks_falls_back_to_cpu(tmp_path: Path) -> None:
    publish(tmp_path, "m", 1)
    registry = ModelRegistry(tmp_path, providers=["NoSuchExecutionProvider"])
    assert registry.providers == ["CPUExecutionProvider"]
    assert registry.load("m").providers == ["CPUExecutionProvider"]


def test_one_session_serves_concurrent_threads(tmp_path: Path) -> None:
    publish(tmp_path, "m", 1)
    model = ModelRegistry(tmp_path).load("m")
    results: dict[int, float] = {}

    def work(value: int) -> None:
        for _ in range(20):
            results[value] = float(model.score(frames(4, value))["score"][0])

    threads = [threading.Thread(target=work, args=(v,)) for v in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {v: float(v) for v in range(1, 9)}


def test_registry_imports_neither_torch_nor_training() -> None:
    import subprocess
    import sys

    code = "import sys, service.registry; print([m for m in ('torch', 'training') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
