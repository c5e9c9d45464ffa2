"""The flagged store's idempotent write for batch scoring: once per (model, version, source, key)."""

from __future__ import annotations

from pathlib import Path

import pytest
from service_helpers import solid_png

from service.flagged import FlaggedStore, NewFlag


def flag(key: str, version: int = 1, score: float = 0.9) -> NewFlag:
    return NewFlag(solid_png(200), "bright", version, score, 0.01, key, {"via": "test"})


def test_a_flag_offered_again_is_not_stored_again(tmp_path: Path) -> None:
    with FlaggedStore(tmp_path / "store") as store:
        first = store.add_many_once([flag("a"), flag("b")], ["shard-0.tar", "shard-0.tar"])
        again = store.add_many_once([flag("b"), flag("c")], ["shard-0.tar", "shard-0.tar"])
        assert [r.key for r in first] == ["a", "b"] and [r.key for r in again] == ["c"]
        # The same key from another shard, or scored by another version, is another flag.
        other = store.add_many_once([flag("a"), flag("a", version=2)], ["shard-1.tar", "shard-0.tar"])
        assert [(r.key, r.version) for r in other] == [("a", 1), ("a", 2)]
        records, total = store.list(limit=10, newest_first=False)
        assert total == 5 and (records[0].id, records[0].key) == (first[0].id, "a")


def test_every_flag_needs_a_key_and_a_source(tmp_path: Path) -> None:
    with FlaggedStore(tmp_path / "store") as store:
        with pytest.raises(ValueError, match="key"):
            store.add_many_once([NewFlag(solid_png(1), "bright", 1, 0.9, 0.01)], ["s"])
        with pytest.raises(ValueError, match="sources"):
            store.add_many_once([flag("a")], [])
        assert store.count() == 0
