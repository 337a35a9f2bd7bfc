"""`curia-node results ...`: what the node produced, where it went, and re-queueing."""

from __future__ import annotations

from typing import Annotated

import typer
from pydicom import dcmread
from rich.console import Console
from rich.table import Table

from node.catalogue.db import Catalogue, upgrade
from node.cli.options import ConfigOption, cli_actor, settings_or_exit
from node.core.settings import Settings
from node.web.results import (
    SR_SOP_CLASSES,
    ResultsError,
    list_deliveries,
    render_html,
    render_text,
    request_rerun,
    requeue,
    result_files,
)

results_app = typer.Typer(help="Results (SR, SEG) and their deliveries.")


@results_app.callback()
def results_options(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Load the settings once for every `results` command."""
    settings = settings_or_exit(config)
    settings.ensure_dirs()
    upgrade(settings.effective_database_url)
    ctx.obj = {"settings": settings, "catalogue": Catalogue(settings.effective_database_url)}


@results_app.command("deliveries")
def deliveries(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(help="pending, sent or failed")] = None,
) -> None:
    """List deliveries; `--state failed` is the dead-letter list."""
    table = Table("id", "destination", "state", "attempts", "result", "last error")
    for d in list_deliveries(ctx.obj["catalogue"], state):
        table.add_row(
            str(d.id), d.destination, d.state, str(d.attempts), d.result_kind, d.last_error or ""
        )
    Console().print(table)


@results_app.command("retry")
def retry(
    ctx: typer.Context,
    delivery_ids: Annotated[list[int] | None, typer.Argument(help="delivery ids")] = None,
    all_failed: Annotated[bool, typer.Option("--all-failed", help="every failed one")] = False,
) -> None:
    """Re-queue dead-lettered deliveries."""
    from pipelines.jobs.celery_app import create_app

    settings: Settings = ctx.obj["settings"]
    catalogue: Catalogue = ctx.obj["catalogue"]
    ids = list(delivery_ids or [])
    if all_failed:
        ids += [d.id for d in list_deliveries(catalogue, "failed")]
    if not ids:
        typer.echo("nothing to retry", err=True)
        raise typer.Exit(1)
    task = create_app(settings).tasks["curia.dispatch_result"]
    for delivery_id in ids:
        try:
            requeue(catalogue, delivery_id, cli_actor(), task.delay)
        except ResultsError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        typer.echo(f"delivery {delivery_id} re-queued")


@results_app.command("rerun")
def rerun(ctx: typer.Context, series_uid: str) -> None:
    """Analyse a series again; the new SR says which one it supersedes."""
    from pipelines.jobs.celery_app import create_app

    settings: Settings = ctx.obj["settings"]
    task = create_app(settings).tasks["curia.prepare_series"]
    try:
        run_id = request_rerun(ctx.obj["catalogue"], series_uid, cli_actor(), task.delay)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"re-run {run_id} queued")


@results_app.command("show")
def show(
    ctx: typer.Context,
    study_uid: str,
    html: Annotated[bool, typer.Option("--html", help="HTML (dsr2html) instead of text")] = False,
) -> None:
    """Render the study's Structured Reports as a radiologist reads them."""
    settings: Settings = ctx.obj["settings"]
    try:
        files = result_files(ctx.obj["catalogue"], settings.results_dir, study_uid)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    reports = [
        f for f in files if str(dcmread(f, stop_before_pixels=True).SOPClassUID) in SR_SOP_CLASSES
    ]
    if not reports:
        typer.echo("no report for this study", err=True)
        raise typer.Exit(1)
    for path in reports:
        typer.echo(render_html(path) if html else render_text(dcmread(path)))
