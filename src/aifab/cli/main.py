"""The ``aifab`` command line: a Typer app whose subcommands live in small modules.

``sim``, ``packing`` and ``demo`` import the simulator and the scheduler (numpy and more): they
are loaded only when one of them runs or the command list is shown, so that the platform's
client commands (``aifab ps``, ``aifab run``, ...) start quickly.
"""

from __future__ import annotations

import importlib
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from aifab import __version__
from aifab.cli.platform import register

# name -> (module, function); listed before the platform commands, or after them.
_LAZY_FIRST = {"sim": ("aifab.cli.sim", "sim_command"), "packing": ("aifab.cli.packing", "packing_command")}
_LAZY_LAST = {"demo": ("aifab.cli.demo", "demo_command")}


class _Commands(TyperGroup):
    """The app's commands, with the heavy ones loaded on first use."""

    # (Typer's click types are private to it: the context and commands are typed Any here.)
    def list_commands(self, ctx: Any) -> list[str]:
        names = [n for n in super().list_commands(ctx) if n not in _LAZY_FIRST and n not in _LAZY_LAST]
        groups = [n for n in names if isinstance(self.commands[n], TyperGroup)]  # listed last
        plain = [n for n in names if n not in groups]
        return [*_LAZY_FIRST, *plain, *_LAZY_LAST, *groups]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        lazy = _LAZY_FIRST.get(cmd_name) or _LAZY_LAST.get(cmd_name)
        if lazy is not None and cmd_name not in self.commands:
            module, function = lazy
            one = typer.Typer(add_completion=False)
            one.command(cmd_name)(getattr(importlib.import_module(module), function))
            self.add_command(typer.main.get_command(one), cmd_name)
        return super().get_command(ctx, cmd_name)


app = typer.Typer(
    name="aifab",
    help="aifab: pool every accelerator, schedule fairly, measure honestly.",
    no_args_is_help=True,
    add_completion=False,
    cls=_Commands,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"aifab {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """aifab command line."""


register(app)

if __name__ == "__main__":
    app()
