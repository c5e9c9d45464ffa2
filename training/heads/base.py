"""What a score head is (:class:`HeadSpec`) and the two errors its build may raise.

A head turns a run into a score graph: uint8 NHWC frames in, ``score [N]`` or ``(score [N],
anomaly_map [N, H, W])`` out (docs/architecture.md, "Score graphs"). Some heads need more than the
run's network: a patch bank, a trained segmentation net, combo statistics. Those are made by
``fit(run_dir)`` and cached in ``RUN_DIR/banks/``; ``build(run_dir)`` only assembles the graph from
what is there and never trains, so building is always cheap (anomalib keeps fitting and the model
apart in the same way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


class HeadUnavailable(ValueError):
    """This run was trained without what the head needs (e.g. ``--seg-steps 0``); not a bug."""


class HeadNotFitted(FileNotFoundError):
    """The run lacks the head's fitted state (bank, seg net, statistics), or it is stale: fit first."""


def _always(config: dict[str, Any]) -> bool:
    return True


@dataclass(frozen=True)
class HeadSpec:
    """One score head: what it means and how to make its graph.

    ``build(run_dir)`` assembles the eval-mode graph from the run and its cached fitted state, and
    raises :class:`HeadNotFitted` when that state is missing or stale. ``fit(run_dir)`` (None: the
    head needs nothing beyond the network) computes that state from the run's own data splits and
    caches it; it is a no-op when the cache is fresh. ``available(config)`` says whether a run with
    this resolved config has the head at all.
    """

    name: str
    kind: str
    units: str
    definition: str
    has_map: bool
    build: Callable[[Path], nn.Module]
    fit: Callable[[Path], None] | None = None
    available: Callable[[dict[str, Any]], bool] = _always

    def graph(self, run_dir: Path) -> nn.Module:
        """The head's graph, fitting first if the run lacks its fitted state (old runs, dry runs)."""
        try:
            return self.build(run_dir).eval()
        except HeadNotFitted:
            if self.fit is None:
                raise
        self.fit(run_dir)
        return self.build(run_dir).eval()
