"""`curia-node quarantine ...`: what the node refused and kept, and removing it."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from node.cli.options import ConfigOption, fail, settings_or_exit
from node.core.logs import escape
from node.store.quarantine import Quarantine

quarantine_app = typer.Typer(help="Refused instances kept with why (retention applies).")


def _quarantine(config: ConfigOption) -> Quarantine:
    settings = settings_or_exit(config)
    return Quarantine(
        settings.quarantine_dir, settings.quarantine_max_age_days, settings.quarantine_max_mb << 20
    )


@quarantine_app.command("list")
def list_(
    config: ConfigOption = None,
    limit: Annotated[int, typer.Option(help="newest records to show")] = 50,
) -> None:
    """Show the newest records: when, from which AE title, why, how big, and the kept file."""
    quarantine = _quarantine(config)
    records = list(quarantine.records())
    table = Table("received", "calling AE", "size", "reason", "file")
    for record in records[-limit:]:
        table.add_row(
            record.received_at[:19],
            escape(record.calling_ae_title or ""),
            str(record.size),
            escape(record.reason)[:80],
            str(record.file) if record.file else "(in the record)",
        )
    Console().print(table)
    typer.echo(f"{len(records)} record(s), {quarantine.usage()} bytes", err=True)


@quarantine_app.command("purge")
def purge(
    config: ConfigOption = None,
    older_than_days: Annotated[
        float | None, typer.Option(help="remove days older than this many days")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="remove every record")] = False,
    retention: Annotated[
        bool, typer.Option(help="apply the configured age and size limits now")
    ] = False,
) -> None:
    """Remove quarantined records: by age, all of them, or as the retention would."""
    quarantine = _quarantine(config)
    if sum((older_than_days is not None, all_, retention)) != 1:
        raise fail("give exactly one of --older-than-days, --all, --retention")
    if retention:
        removed, freed = quarantine.enforce()
    else:
        age = None if all_ else timedelta(days=older_than_days or 0.0)
        removed, freed = quarantine.purge(age)
    typer.echo(f"removed {removed} record(s), {freed} bytes")
