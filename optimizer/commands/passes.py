"""`optimize passes`: list every pass with its contract and options."""

from __future__ import annotations

import click

from optimizer.commands.common import debug_option


@click.command("passes")
@debug_option
def command(debug):
    """List every pass with its contract and options."""
    from optimizer.console import print_passes

    print_passes()
