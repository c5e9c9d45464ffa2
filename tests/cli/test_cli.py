"""The `edgecase` command: one dispatcher, every subcommand documented with an example."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgecase.cli import COMMANDS, build_parser


def registered_commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return list(sub.choices)


def test_every_listed_command_is_registered() -> None:
    assert registered_commands() == [c for c in COMMANDS if c in registered_commands()]
    assert {"synth", "train", "export", "serve", "demo"} <= set(registered_commands())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    if command not in registered_commands():
        pytest.fail(f"edgecase {command} is listed in COMMANDS but not registered")
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "Example:" in out and f"edgecase {command}" in out


def test_building_the_parser_imports_no_heavy_dependency() -> None:
    """`edgecase serve` must work on a machine without torch: handlers import lazily."""
    code = (
        "import sys; from edgecase.cli import build_parser; build_parser();"
        "heavy = ('torch', 'fastapi', 'onnxruntime', 'sklearn', 'matplotlib');"
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_no_command_prints_help_and_exits_2() -> None:
    result = subprocess.run([sys.executable, "-m", "edgecase.cli"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "synth" in result.stdout
