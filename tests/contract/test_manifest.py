"""The manifest schema: what a valid manifest holds, what is refused, and how p-values are computed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from contract.manifest import (
    MAX_STORED_SCORES,
    Manifest,
    ManifestError,
    file_entry,
    load_manifest,
    quantiles_of,
    thin_scores,
)


def manifest_dict(scores: list[float] | None = None, **overrides: Any) -> dict[str, Any]:
    """A complete, valid manifest as plain JSON data."""
    scores = sorted(scores if scores is not None else [1.0, 2.0, 2.0, 3.0, 5.0])
    data: dict[str, Any] = {
        "schema_version": 1,
        "name": "vae-elbo",
        "version": 1,
        "created_at": "2026-01-01T00:00:00Z",
        "model": {"kind": "vae", "head": "vae-elbo", "definition": "negative ELBO", "units": "nats"},
        "input": {"height": 64, "width": 64},
        "outputs": [{"name": "score", "shape": ["N"]}, {"name": "anomaly_map", "shape": ["N", 64, 64]}],
        "threshold": {"value": 4.0, "target_fpr": 0.01, "calibration_n": len(scores)},
        "calibration": {"n": len(scores), "quantiles": quantiles_of(scores), "scores": scores},
        "training": {"run_dir": "runs/vae", "data_fingerprint": "ab" * 32, "data_sources": ["data/"]},
        "export": {
            "opset": 17,
            "exporter": "torch.onnx.export(dynamo=False)",
            "torch_version": "2.13.0",
            "onnx_version": "1.17",
            "onnxruntime_version": "1.20",
            "parity": {"max_rel_diff": 1e-7, "eps": 1e-6, "n_frames": 74, "batch_sizes": [1, 37]},
        },
        "files": {"model.onnx": {"sha256": "0" * 64, "bytes": 123}},
    }
    data.update(overrides)
    return data


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    return path


def test_a_manifest_of_the_legacy_crop_rule_still_loads(tmp_path: Path) -> None:
    data = manifest_dict()
    data["input"]["resize_rule"] = "center-crop-bilinear"
    assert load_manifest(write(tmp_path, data)).input.resize_rule == "center-crop-bilinear"


def test_a_complete_manifest_loads_with_the_documented_defaults(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, manifest_dict()))
    assert manifest.input.layout == "NHWC" and manifest.input.dtype == "uint8"
    assert manifest.input.frame_shape == (64, 64, 3)
    assert manifest.input.resize_rule == "fit-pad-bilinear"
    assert manifest.input.size == (64, 64) and str(manifest.input.size) == "64x64"
    assert manifest.model.higher_is_more_anomalous is True
    assert manifest.threshold.calibrated_with == "onnxruntime"
    assert manifest.export.variant == "fp32"
    assert manifest.output_names == ["score", "anomaly_map"]


def test_round_trip_through_json_is_lossless(tmp_path: Path) -> None:
    manifest = Manifest.model_validate(manifest_dict())
    path = tmp_path / "manifest.json"
    manifest.write(path)
    assert load_manifest(tmp_path) == manifest  # a version folder is accepted as well as the file


def test_p_values_follow_the_conformal_formula() -> None:
    cal = [1.0, 2.0, 2.0, 3.0, 5.0]
    manifest = Manifest.model_validate(manifest_dict(cal))
    scores = np.array([0.0, 1.0, 2.0, 2.5, 5.0, 9.0])
    expected = [(1 + sum(c >= s for c in cal)) / (len(cal) + 1) for s in scores]
    np.testing.assert_allclose(manifest.p_values(scores), expected)
    assert manifest.p_values(np.array([100.0]))[0] == pytest.approx(1 / 6)  # never zero


def test_p_values_refuse_non_finite_scores() -> None:
    manifest = Manifest.model_validate(manifest_dict())
    with pytest.raises(ValueError, match="finite"):
        manifest.p_values([np.nan])


def test_thinned_scores_keep_p_values_close_to_exact() -> None:
    rng = np.random.default_rng(0)
    cal = rng.normal(size=50_000)
    thinned = thin_scores(cal)
    assert len(thinned) == MAX_STORED_SCORES and thinned[0] == cal.min() and thinned[-1] == cal.max()
    data = manifest_dict(thinned)
    data["calibration"]["n"] = data["threshold"]["calibration_n"] = cal.size
    manifest = Manifest.model_validate(data)
    assert not manifest.calibration.exact
    s = rng.normal(size=200)
    exact = (1 + (cal[None, :] >= s[:, None]).sum(1)) / (cal.size + 1)
    np.testing.assert_allclose(manifest.p_values(s), exact, atol=2e-4)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: d.update(schema_version=2), "schema_version 2 is not supported"),
        (lambda d: d["input"].update(layout="NCHW"), "input.layout"),
        (lambda d: d["input"].update(height=0), "input.height"),
        (lambda d: d.update(outputs=[{"name": "anomaly_map", "shape": ["N", 64, 64]}]), "include 'score'"),
        (lambda d: d.update(files={}), "model.onnx"),
        (lambda d: d["calibration"].update(scores=[3.0, 1.0]), "sorted"),
        (lambda d: d["threshold"].update(calibration_n=99), "calibration_n=99"),
        (lambda d: d["model"].update(higher_is_more_anomalous=False), "higher_is_more_anomalous"),
        (lambda d: d["export"].update(variant="int4"), "export.variant"),
        (lambda d: d.update(unexpected=1), "unexpected"),
        (lambda d: d["files"]["model.onnx"].update(sha256="xyz"), "sha256"),
    ],
)
def test_invalid_manifests_are_refused_naming_the_file_and_field(
    tmp_path: Path, change: Any, problem: str
) -> None:
    data = manifest_dict()
    change(data)
    path = write(tmp_path, data)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(path) in str(info.value)
    assert problem in str(info.value)


def test_missing_or_garbled_manifest_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "nope.json")
    bad = tmp_path / "manifest.json"
    bad.write_text("{ not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ManifestError, match="JSON object"):
        load_manifest(bad)


def test_file_entry_hashes_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"abc")
    entry = file_entry(path)
    assert entry.bytes == 3
    assert entry.sha256 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_contract_manifest_does_not_import_torch_or_onnxruntime() -> None:
    import subprocess
    import sys

    code = "import sys, contract.manifest; print([m for m in ('torch', 'onnxruntime') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
