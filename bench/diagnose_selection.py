"""Diagnosis: the ensemble's selection as the validation protocol saw it, beside the test families.

The ensemble head keeps the components and rule that score best on the validation protocol
(training/protocol.py: half A gives statistics; half B's normals against its pasted patches and
held-out corruptions). When a run's test figures disappoint, the question is whether the protocol
preferred a worse selection (a fault of the selection) or could not tell it apart (a fault of the
protocol's data). This recomputes every candidate's scores on the protocol's frames exactly as
``fit_combo`` does, caches them beside the run, and prints one row per selection: its protocol score
on validation (corruption groups weighed equally, as selected now, and frames weighed equally, as
before the eighth session), and its mean AUROC and mean detection rate over the bench run's test
families. The rows are the selection ``select_components`` makes now, the one stored in the run's cache
(``banks/ensemble-combo.json``), each candidate alone, and every ``--combo`` given.

Test detection uses the 1% threshold of half B's normals (the run's calibration uses all validation
normals), so it approximates the run's own figures. Diagnosis only: the test families never choose
anything here. On the seventh session's 64x64 runs this reproduces docs/benchmarks.md's table "The
64x64 regression fixed" (46 s at 64x64; the scores are cached in the bench folder):

    .venv/bin/python bench/diagnose_selection.py /tmp/bench/acc64w \\
        --combo gan-seg+vae-complexity:max --combo vae-seg+gan-seg+gan-disc+vae-complexity:mean
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.calibrate import score_frames, threshold_of_sorted
from training.ensemble import HEAD
from training.heads.combo import MAX_COMBO_VAL, graphs_fingerprint, robust_stats
from training.heads.ensemble import _candidates
from training.protocol import (
    PROTOCOL_FPR,
    RULES,
    combine,
    protocol_frames,
    protocol_score,
    select_components,
)
from training.runs import run_normals

Selection = tuple[list[str], str]


def protocol_scores(ensemble_dir: Path, cache: Path) -> dict[str, np.ndarray]:
    """Every candidate's raw scores on half A, half B, and the corrupted copies of half B (cached,
    keyed by the candidates' weights and statistics: a re-trained member run is scored again)."""
    names, graphs, _ = _candidates(ensemble_dir, fit=False)
    fingerprint = graphs_fingerprint(graphs)
    if cache.exists():
        with np.load(cache) as stored:
            if str(stored["fingerprint"]) == fingerprint:
                return dict(stored)
    val = run_normals(ensemble_dir, split="val", limit=MAX_COMBO_VAL)
    half_a, half_b, pseudo, heldout, groups = protocol_frames(val)
    corrupted = np.r_[pseudo, heldout]
    out = {"fingerprint": np.array(fingerprint), "names": np.array(names), "groups": groups}
    for name, graph in zip(names, graphs, strict=True):
        out[f"{name}|a"] = score_frames(graph, half_a, desc=f"half A {name}")
        out[f"{name}|b"] = score_frames(graph, half_b, desc=f"half B {name}")
        out[f"{name}|c"] = score_frames(graph, corrupted, desc=f"corrupted {name}")
    tmp = cache.with_name(f".{cache.name}.tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(cache)
    return out


def z_scores(val: dict[str, np.ndarray], names: list[str], key: str) -> np.ndarray:
    """Scores [N, K] of ``names`` on one protocol set (``b`` normals, ``c`` corrupted), standardised
    by half A's median and MAD as the combo head does."""
    columns = []
    for name in names:
        center, scale = robust_stats(val[f"{name}|a"])
        columns.append((val[f"{name}|{key}"] - center) / scale)
    return np.stack(columns, 1)


def test_figures(
    selection: Selection, val: dict[str, np.ndarray], test: dict[str, np.ndarray]
) -> tuple[float, float]:
    """Mean AUROC and mean detection rate (at half B's 1% threshold) over the test families."""
    names, rule = selection
    stats = [robust_stats(val[f"{n}|a"]) for n in names]
    z_test = np.stack([(test[n] - c) / s for n, (c, s) in zip(names, stats, strict=True)], 1)
    threshold = threshold_of_sorted(np.sort(combine(z_scores(val, names, "b"), rule)), PROTOCOL_FPR)
    scores, families = combine(z_test, rule), test["families"]
    normal = scores[families == "normal"]
    aurocs, detections = [], []
    for family in sorted(set(families.tolist()) - {"normal"}):
        edge = scores[families == family]
        labels = np.r_[np.zeros(len(normal)), np.ones(len(edge))]
        aurocs.append(roc_auc_score(labels, np.r_[normal, edge]))
        detections.append(float(np.mean(edge > threshold)))
    return float(np.mean(aurocs)), float(np.mean(detections))


def validation_score(selection: Selection, val: dict[str, np.ndarray], by_group: bool = True) -> float:
    """The protocol score of a selection: what ``select_components`` maximises (corruption groups
    weighed equally), or with ``by_group`` false every corrupted frame weighed equally (the protocol
    before the eighth session)."""
    names, rule = selection
    normal, corrupted = combine(z_scores(val, names, "b"), rule), combine(z_scores(val, names, "c"), rule)
    return protocol_score(normal, corrupted, groups=val["groups"] if by_group else None)


def parse_combo(text: str, candidates: list[str]) -> Selection:
    """``a+b+c:rule`` -> (components, rule), with the names checked against the run's candidates."""
    components, _, rule = text.rpartition(":")
    names = components.split("+")
    unknown = [n for n in names if n not in candidates]
    if not components or rule not in RULES or unknown:
        raise SystemExit(
            f"--combo {text!r}: want NAME+NAME:RULE with RULE one of {', '.join(RULES)} and names among "
            f"{', '.join(candidates)}" + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return names, rule


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python bench/diagnose_selection.py /tmp/bench/acc64w --combo vae-seg+gan-seg:mean",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "bench_dir", type=Path, help="a bench_accuracy.py output folder (ensemble/, scores_*.npz)"
    )
    parser.add_argument("--combo", action="append", default=[], help="a selection to score: NAME+NAME:RULE")
    args = parser.parse_args()
    ensemble_dir = args.bench_dir / "ensemble"
    tests = sorted(args.bench_dir.glob("scores_*.npz"))
    if not ensemble_dir.is_dir() or not tests:
        raise SystemExit(
            f"{args.bench_dir}: want an ensemble/ run and a scores_*.npz (bench_accuracy.py output)"
        )
    val = protocol_scores(ensemble_dir, args.bench_dir / "selection_protocol_scores.npz")
    with np.load(tests[0]) as stored:
        test = dict(stored)
    candidates = [str(n) for n in val["names"]]
    missing = [n for n in candidates if n not in test]
    if missing:
        raise SystemExit(f"{tests[0]} has no test scores for {', '.join(missing)}")

    z_b, z_c = z_scores(val, candidates, "b"), z_scores(val, candidates, "c")
    rule, columns, _ = select_components(z_b, z_c, val["groups"])
    rows: list[tuple[str, Selection]] = [("select_components now", ([candidates[i] for i in columns], rule))]
    stored_cache = ensemble_dir / "banks" / f"{HEAD}.json"
    if stored_cache.exists():
        record = json.loads(stored_cache.read_text())
        rows.append(
            (f"stored in the run (format {record.get('version')})", (record["components"], record["rule"]))
        )
    rows += [("--combo", parse_combo(text, candidates)) for text in args.combo]
    rows += [("alone", ([name], "max")) for name in candidates]

    print(f"{args.bench_dir}: {len(z_b)} validation normals (half B), {len(z_c)} corrupted copies")
    print("| selection (components: rule) | row | protocol score: groups / frames | test AUROC | test det. |")
    print("|---|---|---:|---:|---:|")
    for label, selection in rows:
        auroc, detection = test_figures(selection, val, test)
        text = f"{', '.join(selection[0])}: {selection[1]}"
        grouped, framed = validation_score(selection, val), validation_score(selection, val, by_group=False)
        print(f"| {text} | {label} | {grouped:.3f} / {framed:.3f} | {auroc:.3f} | {detection:.3f} |")


if __name__ == "__main__":
    main()
