"""``ensemble-combo``: the one head of an ensemble run over a VAE run and a GAN run.

The two families of generative model fail on different edge cases: the GAN's discriminator-feature
heads see the global changes (fog, rain, glare) that the VAE's likelihood is fooled by (Nalisnick et
al. 2019), while the VAE's reconstruction-based seg head and its patch head see small objects. The
head takes the components of both members' ``<kind>-combo`` heads as candidates, standardises them
on the shared validation normals and keeps those the validation protocol selects
(training/protocol.py, ``select_components``): nine candidates include near-duplicates (two
likelihoods, two patch heads), and a plain combination of all of them dilutes the few heads that see
a small object. The run itself (config, members) is training/ensemble.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from training.ensemble import HEAD, KIND, member_runs
from training.heads.base import HeadSpec
from training.heads.combo import DEFAULT_COMPONENTS, ComboGraph, component_graphs, fit_combo, load_combo
from training.runs import load_config

if TYPE_CHECKING:
    from torch import nn


def _candidates(run_dir: Path, fit: bool) -> tuple[list[str], list[nn.Module], Path]:
    sources = []
    for member in member_runs(run_dir):
        kind = str(load_config(member)["kind"])
        sources += [(member, head) for head in DEFAULT_COMPONENTS[kind]]
    names, graphs = component_graphs(sources, fit=fit)
    if not names:
        raise ValueError(f"{run_dir}: no member head could be built for {HEAD}")
    return names, graphs, run_dir / "banks" / f"{HEAD}.json"


def load_ensemble_graph(run_dir: str | Path) -> ComboGraph:
    """The ``ensemble-combo`` graph from its cached selection and statistics."""
    names, graphs, cache = _candidates(Path(run_dir), fit=False)
    return load_combo(names, graphs, cache, select=True)


def fit_ensemble(run_dir: str | Path) -> None:
    """Fit the members' components that need it, then select and standardise the ensemble's."""
    names, graphs, cache = _candidates(Path(run_dir), fit=True)
    fit_combo(names, graphs, Path(run_dir), cache, label=HEAD, select=True)


ENSEMBLE_HEADS = [
    HeadSpec(
        name=HEAD,
        kind=KIND,
        units="combined z-score",
        definition="combination of standardised head scores of a VAE run and a GAN run (statistics on "
        "their shared validation normals; components and rule selected on self-supervised "
        "pseudo-anomalies); map of the first selected head that has one",
        has_map=True,
        build=load_ensemble_graph,
        fit=fit_ensemble,
    )
]
