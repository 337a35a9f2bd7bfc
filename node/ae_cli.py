"""`curia-node ae ...`: the node's peers from the command line."""

from __future__ import annotations

import getpass
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from node.catalogue.db import Catalogue, upgrade
from node.cli_options import ConfigOption, settings_or_exit
from node.peers import PeerError, add_source, list_sources, remove_source
from node.settings import Settings

ae_app = typer.Typer(help="AE titles and peers.")
source_app = typer.Typer(help="Senders allowed to store into the node (the allow-list).")
ae_app.add_typer(source_app, name="source")


@ae_app.callback()
def ae_options(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Load the settings once for every `ae` command."""
    ctx.obj = {"settings": settings_or_exit(config)}


def _catalogue(ctx: typer.Context) -> Catalogue:
    settings: Settings = ctx.obj["settings"]
    settings.ensure_dirs()
    upgrade(settings.effective_database_url)
    return Catalogue(settings.effective_database_url)


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except OSError:
        return "cli"


@source_app.command("add")
def source_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="a name for this sender, e.g. ct-scanner-1")],
    ae_title: Annotated[str, typer.Option("--ae-title", "-a", help="its calling AE title")],
    host: Annotated[
        str | None,
        typer.Option(help="IP, CIDR network or host name it connects from; omit for any"),
    ] = None,
) -> None:
    """Allow a sender (calling AE title, optionally bound to an address)."""
    try:
        peer = add_source(_catalogue(ctx), name, ae_title, host, _actor())
    except PeerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    where = peer.host or "any address"
    typer.echo(f"source {peer.name!r} added: AE title {peer.ae_title!r} from {where}")


@source_app.command("list")
def source_list(ctx: typer.Context) -> None:
    """Show the allow-list."""
    table = Table("name", "AE title", "host")
    for peer in list_sources(_catalogue(ctx)):
        table.add_row(peer.name, peer.ae_title, peer.host or "(any)")
    Console().print(table)


@source_app.command("remove")
def source_remove(ctx: typer.Context, name: str) -> None:
    """Remove a sender from the allow-list."""
    try:
        remove_source(_catalogue(ctx), name, _actor())
    except PeerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"source {name!r} removed")
