"""What every `curia-node` command group shares: the --config option and loading settings."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from node.catalogue.db import Catalogue, upgrade
from node.core.settings import Settings, load_settings

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (else $CURIA_CONFIG)", exists=True),
]


def settings_or_exit(config: Path | None) -> Settings:
    """The settings, or exit 2 with the validation errors: a bad config is a CLI error."""
    try:
        return load_settings(config)
    except ValidationError as exc:
        typer.echo(f"invalid configuration:\n{exc}", err=True)
        raise typer.Exit(2) from exc


def open_catalogue(settings: Settings) -> Catalogue:
    """The catalogue at the newest schema (commands may run before the node ever started)."""
    settings.ensure_dirs()
    upgrade(settings.effective_database_url)
    return Catalogue(settings.effective_database_url)


def context_settings(ctx: typer.Context) -> Settings:
    """The settings a command group's callback loaded into ``ctx.obj``."""
    settings: Settings = ctx.obj["settings"]
    return settings


def context_catalogue(ctx: typer.Context) -> Catalogue:
    """The catalogue of the settings a command group's callback loaded."""
    return open_catalogue(context_settings(ctx))


def given(**values: Any) -> dict[str, Any]:
    """The options actually given on the command line (``None`` means 'not given')."""
    return {key: value for key, value in values.items() if value is not None}


def cli_actor() -> str:
    """Who a command-line change is attributed to in the audit trail."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return "cli"


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` to stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)
