"""`curia-node status`: what the node holds and did, series by series, from the catalogue.

The same overview the dashboard shows (no patient data): per study its series with their
state, and for a series that was not analysed, why; then the counts by state.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from node.catalogue.db import Catalogue, upgrade
from node.cli.options import ConfigOption, settings_or_exit
from node.web.dashboard import overview


def _series_row(study_uid: str, series: dict[str, Any]) -> list[str]:
    runs = series["runs"]
    last = runs[-1] if runs else None
    run = f"#{last['id']} {last['state']}" if last else "-"
    return [
        study_uid,
        series["uid"],
        series["modality"] or "?",
        str(series["instance_count"]),
        series["state"].replace("_", " "),
        series["state_reason"] or "",
        run,
    ]


def status(
    config: ConfigOption = None,
    study: Annotated[str | None, typer.Option(help="only this study (StudyInstanceUID)")] = None,
) -> None:
    """The newest studies, each series' state (and why a series was not analysed), and the
    counts by state."""
    settings = settings_or_exit(config)
    upgrade(settings.effective_database_url)
    catalogue = Catalogue(settings.effective_database_url)
    try:
        current = overview(catalogue)
    finally:
        catalogue.dispose()
    table = Table("study", "series", "modality", "objects", "state", "reason", "last run")
    for item in current["studies"]:
        if study is not None and item["study_instance_uid"] != study:
            continue
        for series in item["series"]:
            table.add_row(*_series_row(item["study_instance_uid"], series))
    console = Console(width=200)
    console.print(table)
    counts = current["counts"]
    states = ", ".join(
        f"{k.replace('_', ' ')} {v}" for k, v in sorted(counts["series_by_state"].items())
    )
    console.print(
        f"{counts['studies']} studies, {counts['series']} series ({states or 'none'}), "
        f"{counts['instances_received']} objects received"
    )
