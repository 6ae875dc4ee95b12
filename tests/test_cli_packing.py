"""`aifab packing` (the README's main job) driven like a user: a real run, and bad input."""

from __future__ import annotations

from typer.testing import CliRunner

from aifab.cli.main import app

runner = CliRunner()


def test_packing_prints_ours_next_to_the_paper() -> None:
    result = runner.invoke(app, ["packing", "--policy", "bestfit", "--seeds", "42"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "BestFit" in result.output
    # The published BestFit mean at 130 % arrived on the default trace, in brackets.
    assert "[93.08]" in result.output


def test_unknown_policy_is_a_clear_error() -> None:
    result = runner.invoke(app, ["packing", "--policy", "nope"])
    assert result.exit_code == 2
    assert "unknown placement policy 'nope'" in result.output
    assert "Traceback" not in result.output


def test_missing_trace_is_a_clear_error() -> None:
    result = runner.invoke(app, ["packing", "--trace", "nope"])
    assert result.exit_code == 2
    assert "--trace: no pod list" in result.output


def test_bad_seeds_are_refused() -> None:
    result = runner.invoke(app, ["packing", "--seeds", "forty-two"])
    assert result.exit_code == 2
    assert "seeds" in result.output
