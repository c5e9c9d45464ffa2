"""The model repository's folder rule: ``models/<name>/<version>/``, Triton's layout.

A version is a folder named by a positive integer; the highest one serves. Anything else beside the
versions (dot-folders of an export in progress, notes) is not a version. Export picks the next
number by this rule and the service lists versions by it, so both sides agree on what exists.
"""

from __future__ import annotations

from pathlib import Path


def version_of(folder: Path) -> int | None:
    """The version a folder's name says (``models/m/3`` -> 3), or None when it names no version."""
    return int(folder.name) if folder.name.isdigit() and int(folder.name) > 0 else None


def list_versions(model_dir: Path) -> list[int]:
    """Published versions of a model, ascending; dot-folders (exports in progress) and other names skipped."""
    children = model_dir.iterdir() if model_dir.is_dir() else iter(())
    return sorted(v for child in children if child.is_dir() and (v := version_of(child)) is not None)


def next_version(model_dir: Path) -> int:
    """One more than the highest published version (1 for a new model)."""
    return max(list_versions(model_dir), default=0) + 1
