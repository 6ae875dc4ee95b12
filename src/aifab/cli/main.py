"""The ``aifab`` command line: a Typer app whose subcommands live in small modules."""

from __future__ import annotations

from typing import Annotated

import typer

from aifab import __version__
from aifab.cli.demo import demo_command
from aifab.cli.packing import packing_command
from aifab.cli.platform import register
from aifab.cli.sim import sim_command

app = typer.Typer(
    name="aifab",
    help="aifab: pool every accelerator, schedule fairly, measure honestly.",
    no_args_is_help=True,
    add_completion=False,
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


app.command("sim")(sim_command)
app.command("packing")(packing_command)
register(app)
app.command("demo")(demo_command)

if __name__ == "__main__":
    app()
