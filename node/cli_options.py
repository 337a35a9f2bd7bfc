"""What every `curia-node` command group shares: the --config option and loading settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from node.settings import Settings, load_settings

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
