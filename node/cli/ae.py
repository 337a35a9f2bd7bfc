"""`curia-node ae ...`: the node's peers (senders and destinations) from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from node.cli.options import (
    ConfigOption,
    cli_actor,
    context_catalogue,
    context_settings,
    fail,
    given,
    settings_or_exit,
)
from node.cli.source_settings import settings_app
from node.core.settings import Settings
from node.delivery.destinations import (
    DestinationError,
    add_destination,
    check_destination,
    get_destination,
    list_destinations,
    remove_destination,
    update_destination,
)
from node.dimse.allow_list import (
    PeerError,
    add_local_title,
    add_source,
    list_local_titles,
    list_sources,
    remove_local_title,
    remove_source,
    update_source,
)

ae_app = typer.Typer(help="AE titles and peers.")
source_app = typer.Typer(help="Senders allowed to store into the node (the allow-list).")
destination_app = typer.Typer(help="Where results and routed studies are sent.")
local_app = typer.Typer(help="The node's own AE titles (besides dicom.ae_title).")
ae_app.add_typer(source_app, name="source")
ae_app.add_typer(destination_app, name="destination")
ae_app.add_typer(local_app, name="local")
ae_app.add_typer(settings_app, name="settings")


@ae_app.callback()
def ae_options(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Load the settings once for every `ae` command."""
    ctx.obj = {"settings": settings_or_exit(config)}


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
        peer = add_source(context_catalogue(ctx), name, ae_title, host, cli_actor())
    except PeerError as exc:
        raise fail(str(exc)) from exc
    where = peer.host or "any address"
    typer.echo(f"source {peer.name!r} added: AE title {peer.ae_title!r} from {where}")


@source_app.command("edit")
def source_edit(
    ctx: typer.Context,
    name: str,
    ae_title: Annotated[str | None, typer.Option("--ae-title", "-a")] = None,
    host: Annotated[str | None, typer.Option(help="'*' for any address")] = None,
) -> None:
    """Change a sender's AE title or address."""
    if ae_title is None and host is None:
        raise fail("nothing to change: give --ae-title and/or --host")
    try:
        peer = update_source(context_catalogue(ctx), name, cli_actor(), ae_title, host)
    except PeerError as exc:
        raise fail(str(exc)) from exc
    typer.echo(
        f"source {peer.name!r}: AE title {peer.ae_title!r} from {peer.host or 'any address'}"
    )


@source_app.command("list")
def source_list(ctx: typer.Context) -> None:
    """Show the allow-list."""
    table = Table("name", "AE title", "host")
    for peer in list_sources(context_catalogue(ctx)):
        table.add_row(peer.name, peer.ae_title, peer.host or "(any)")
    Console().print(table)


@source_app.command("remove")
def source_remove(ctx: typer.Context, name: str) -> None:
    """Remove a sender from the allow-list."""
    try:
        remove_source(context_catalogue(ctx), name, cli_actor())
    except PeerError as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"source {name!r} removed")


@local_app.command("add")
def local_add(ctx: typer.Context, ae_title: str) -> None:
    """Answer to one more called AE title too (applies to the next association)."""
    try:
        title = add_local_title(context_catalogue(ctx), ae_title, cli_actor())
    except PeerError as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"the node now also answers to {title!r}")


@local_app.command("list")
def local_list(ctx: typer.Context) -> None:
    """The AE titles the node answers to; the first is the configured one."""
    settings: Settings = ctx.obj["settings"]
    typer.echo(f"{settings.dicom.ae_title} (configuration, port {settings.dicom.port})")
    for title in list_local_titles(context_catalogue(ctx)):
        typer.echo(title)


@local_app.command("remove")
def local_remove(ctx: typer.Context, ae_title: str) -> None:
    """Stop answering to a local AE title added before."""
    try:
        remove_local_title(context_catalogue(ctx), ae_title, cli_actor())
    except PeerError as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"the node no longer answers to {ae_title!r}")


Opt = typer.Option


@destination_app.command("add")
def destination_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="a name, e.g. pacs or neuro-stat")],
    protocol: Annotated[str, Opt(help="dimse | stow-rs | orthanc-rest")] = "dimse",
    ae_title: Annotated[str | None, Opt("--ae-title", "-a", help="called AE title")] = None,
    host: Annotated[str | None, Opt(help="DIMSE host")] = None,
    port: Annotated[int | None, Opt(help="DIMSE port")] = None,
    calling_ae_title: Annotated[str | None, Opt(help="our AE title towards it")] = None,
    tls: Annotated[bool | None, Opt("--tls/--no-tls", help="DIMSE over TLS")] = None,
    ca_file: Annotated[Path | None, Opt(help="CA bundle to verify its certificate")] = None,
    cert_file: Annotated[Path | None, Opt(help="our client certificate (PEM)")] = None,
    key_file: Annotated[Path | None, Opt(help="our client key (PEM)")] = None,
    url: Annotated[str | None, Opt(help="DICOMweb root or Orthanc URL")] = None,
    token: Annotated[str | None, Opt(help="bearer token for stow-rs")] = None,
    username: Annotated[str | None, Opt(help="user for orthanc-rest")] = None,
    password: Annotated[str | None, Opt(help="password for orthanc-rest")] = None,
    results: Annotated[bool, Opt("--results/--no-results", help="send every result here")] = True,
) -> None:
    """Add a destination (C-STORE, STOW-RS or Orthanc REST)."""
    data = given(
        name=name,
        protocol=protocol,
        ae_title=ae_title,
        host=host,
        port=port,
        calling_ae_title=calling_ae_title,
        tls=tls,
        ca_file=str(ca_file) if ca_file else None,
        cert_file=str(cert_file) if cert_file else None,
        key_file=str(key_file) if key_file else None,
        url=url,
        token=token,
        username=username,
        password=password,
        results=results,
    )
    try:
        spec = add_destination(context_catalogue(ctx), context_settings(ctx), data, cli_actor())
    except DestinationError as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"destination {spec.name!r} added: {_describe(spec.public())}")


@destination_app.command("edit")
def destination_edit(
    ctx: typer.Context,
    name: str,
    ae_title: Annotated[str | None, Opt("--ae-title", "-a")] = None,
    host: Annotated[str | None, Opt()] = None,
    port: Annotated[int | None, Opt()] = None,
    calling_ae_title: Annotated[str | None, Opt()] = None,
    tls: Annotated[bool | None, Opt("--tls/--no-tls")] = None,
    url: Annotated[str | None, Opt()] = None,
    token: Annotated[str | None, Opt()] = None,
    username: Annotated[str | None, Opt()] = None,
    password: Annotated[str | None, Opt()] = None,
    results: Annotated[bool | None, Opt("--results/--no-results")] = None,
    enabled: Annotated[bool | None, Opt("--enable/--disable")] = None,
) -> None:
    """Change some fields of a destination; the rest stay as they are."""
    changes = given(
        ae_title=ae_title,
        host=host,
        port=port,
        calling_ae_title=calling_ae_title,
        tls=tls,
        url=url,
        token=token,
        username=username,
        password=password,
        results=results,
        enabled=enabled,
    )
    if not changes:
        raise fail("nothing to change: give at least one option")
    try:
        spec = update_destination(
            context_catalogue(ctx), context_settings(ctx), name, changes, cli_actor()
        )
    except DestinationError as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"destination {spec.name!r} changed: {_describe(spec.public())}")


@destination_app.command("list")
def destination_list(
    ctx: typer.Context, as_json: Annotated[bool, Opt("--json", help="JSON output")] = False
) -> None:
    """Show every destination (secrets masked)."""
    specs = [
        spec.public() for spec in list_destinations(context_catalogue(ctx), context_settings(ctx))
    ]
    if as_json:
        typer.echo(json.dumps(specs, indent=2))
        return
    table = Table("name", "protocol", "where", "results", "enabled", "from")
    for spec in specs:
        table.add_row(
            spec["name"],
            spec["protocol"],
            _describe(spec),
            "yes" if spec["results"] else "no",
            "yes" if spec["enabled"] else "no",
            spec["source"],
        )
    Console().print(table)


@destination_app.command("remove")
def destination_remove(ctx: typer.Context, name: str) -> None:
    """Remove a destination (deliveries already made to it are kept in the history)."""
    try:
        remove_destination(context_catalogue(ctx), name, cli_actor())
    except DestinationError as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"destination {name!r} removed")


@destination_app.command("test")
def destination_test(ctx: typer.Context, name: str) -> None:
    """Check that a destination answers: C-ECHO, or an HTTP request; sends no data."""
    settings = context_settings(ctx)
    try:
        spec = get_destination(context_catalogue(ctx), settings, name)
    except DestinationError as exc:
        raise fail(str(exc)) from exc
    outcome = check_destination(spec, settings.dicom.ae_title)
    if not outcome.ok:
        raise fail(f"{outcome.detail} ({outcome.elapsed_ms:.0f} ms)", code=1)
    typer.echo(f"ok: {outcome.detail} ({outcome.elapsed_ms:.0f} ms)")


def _describe(spec: dict[str, Any]) -> str:
    if spec["protocol"] == "dimse":
        tls = " over TLS" if spec.get("tls") else ""
        return f"{spec['ae_title']}@{spec['host']}:{spec['port']}{tls}"
    return f"{spec['protocol']} {spec['url']}"
