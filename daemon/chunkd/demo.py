"""``chunkd demo``: a throwaway Postgres, a sample mailbox sync, the daemon, a live view."""

from __future__ import annotations

import click

__all__ = ["demo"]


@click.command()
def demo() -> None:
    """Run a sample mailbox sync on a throwaway PostgreSQL and show its progress."""
    raise click.ClickException("chunkd demo is not built yet")
