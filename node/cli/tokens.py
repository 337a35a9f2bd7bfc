"""`curia-node token ...`: bearer tokens for the HTTP API, created and revoked by an admin."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from node.cli.options import ConfigOption, cli_actor, fail, open_catalogue, settings_or_exit
from node.web.tokens import ROLES, TokenError, create_token, list_tokens, revoke_token

token_app = typer.Typer(help="API tokens (admin, read, store); kept hashed, shown once.")


@token_app.callback()
def token_options(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Open the catalogue once for every `token` command."""
    ctx.obj = open_catalogue(settings_or_exit(config))


@token_app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="who or what uses it, e.g. alice or ohif")],
    role: Annotated[str, typer.Option(help=f"one of: {', '.join(ROLES)}")] = "read",
) -> None:
    """Create a token and print it; it cannot be shown again (only its hash is kept)."""
    try:
        token = create_token(ctx.obj, name, role, cli_actor())
    except TokenError as exc:
        raise fail(str(exc)) from exc
    typer.echo(token)
    typer.echo(f"{role} token {name!r} created; store it now, it is not shown again", err=True)


@token_app.command("list")
def list_(ctx: typer.Context) -> None:
    """Show tokens (names and roles; never the tokens themselves)."""
    table = Table("name", "role", "created by", "created", "last used", "state")
    for view in list_tokens(ctx.obj):
        last = view.last_used_at.isoformat(timespec="seconds") if view.last_used_at else "never"
        table.add_row(
            view.name,
            view.role,
            view.created_by,
            view.created_at.isoformat(timespec="seconds"),
            last,
            "revoked" if view.revoked else "active",
        )
    Console().print(table)


@token_app.command("revoke")
def revoke(ctx: typer.Context, name: str) -> None:
    """Revoke a token; the API refuses it within a few seconds."""
    try:
        revoke_token(ctx.obj, name, cli_actor())
    except TokenError as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"token {name!r} revoked")
