"""The ``curia-node`` command line."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from node import __version__
from node.cli.ae import ae_app
from node.cli.heads import heads_app
from node.cli.options import ConfigOption, settings_or_exit
from node.cli.quarantine import quarantine_app
from node.cli.results import results_app
from node.cli.rules import rules_app
from node.cli.status import status
from node.cli.tokens import token_app
from node.core.logs import configure_logging, summarise_library_warnings
from node.core.settings import Settings

app = typer.Typer(help="Curia Node: a DICOM node that runs Curia on CT and MRI studies.")
config_app = typer.Typer(help="Inspect the configuration.")
db_app = typer.Typer(help="Manage the catalogue database.")
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(ae_app, name="ae")
app.add_typer(results_app, name="results")
app.add_typer(heads_app, name="heads")
app.add_typer(token_app, name="token")
app.add_typer(rules_app, name="rules")
app.command()(status)
app.add_typer(quarantine_app, name="quarantine")


@app.command()
def run(config: ConfigOption = None) -> None:
    """Start the node: DICOM listener, completion watcher, pipeline worker, HTTP API."""
    settings = settings_or_exit(config)
    configure_logging(settings.log_level, settings.log_format)
    from node.service import NodeService
    from pipelines.model.backbone import WeightsError

    try:
        NodeService(settings).run_forever()
    except WeightsError as exc:
        typer.echo(f"cannot load the Curia weights: {exc}", err=True)
        raise typer.Exit(3) from exc
    except OSError as exc:
        typer.echo(f"cannot start: {exc}", err=True)
        raise typer.Exit(1) from exc


@app.command()
def worker(
    config: ConfigOption = None,
    queues: Annotated[
        str | None,
        typer.Option(
            help="comma-separated stages: prepare (CPU decoding), inference (GPU), report, "
            "dispatch; all if omitted"
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="worker name, unique on this host (default: from the stages), e.g. gpu1"),
    ] = None,
) -> None:
    """Run a separate pipeline worker (production mode); same as `celery ... worker`."""
    settings = settings_or_exit(config)
    summarise_library_warnings()
    from pipelines.jobs.celery_app import STAGES, create_app, queue_name

    stages = [s.strip() for s in queues.split(",")] if queues else list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        typer.echo(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}", err=True)
        raise typer.Exit(2)
    celery_app = create_app(settings)
    # Only a worker that runs inference needs the model (GPU memory, seconds to load).
    celery_app.conf.curia_load_model = "inference" in stages
    celery_app.set_default()  # the worker's threads (timer included) look tasks up in it
    # Node names must be unique per host: two workers on one machine (one per GPU, or a GPU
    # and a CPU worker) would otherwise fight over Celery's control queue.
    node_name = name or f"curia-{'-'.join(stages)}"
    celery_app.worker_main(
        [
            "worker",
            "--pool=solo",
            f"--hostname={node_name}@%h",
            f"--queues={','.join(queue_name(settings, s) for s in stages)}",
            f"--loglevel={settings.log_level}",
        ]
    )


@app.command()
def version() -> None:
    """Print the node's version."""
    typer.echo(__version__)


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective configuration, secrets masked."""
    typer.echo(json.dumps(settings_or_exit(config).masked(), indent=2))


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Check the configuration and the data folder: exit 1 when other users can read it."""
    settings = settings_or_exit(config)
    from node.core.permissions import exposed

    problems = exposed(settings.data_path)
    for problem in problems:
        typer.echo(f"warning: {problem}", err=True)
    if problems:
        typer.echo(f"fix: chmod -R go-rwx {settings.data_path}", err=True)
        raise typer.Exit(1)
    for warning in unknown_senders(settings):
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"configuration valid; data folder {settings.data_path} is private")


def unknown_senders(settings: Settings) -> list[str]:
    """Per-sender settings in the file for AE titles the allow-list does not admit: a typo,
    or a sender still to add. Only said where the catalogue already exists."""
    from node.catalogue.source_settings import configured_titles

    titles = configured_titles(settings)
    if not titles or settings.dicom.accept_any_source:
        return []
    from node.catalogue.db import Catalogue
    from node.dimse.allow_list import list_sources

    try:
        allowed = {
            peer.ae_title for peer in list_sources(Catalogue(settings.effective_database_url))
        }
    except Exception:  # no catalogue yet (or not reachable): nothing to compare with
        return []
    return [
        f"settings for {title!r} in the configuration, but no allowed sender has that AE "
        f"title (add it with `curia-node ae source add`)"
        for title in sorted(titles - allowed)
    ]


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Bring the catalogue schema to the newest revision."""
    settings = settings_or_exit(config)
    from node.catalogue.db import upgrade

    settings.ensure_dirs()
    upgrade(settings.effective_database_url)
    typer.echo("catalogue schema is up to date")


def main() -> None:
    app()
