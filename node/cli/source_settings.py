"""`curia-node ae settings ...`: per-sender settings (by calling AE title) from the command
line: which completion signals a sender is trusted for, and how it takes its storage
commitment reports. Stored in the catalogue over the configuration file's values, audited
(see :mod:`node.catalogue.source_settings`)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from node.catalogue.source_settings import (
    DEFAULT,
    REPORT,
    SIGNALS,
    SourceSetting,
    SourceSettingsError,
    get_source_setting,
    list_source_settings,
    reset_source_setting,
    set_source_setting,
)
from node.cli.options import (
    cli_actor,
    context_catalogue,
    context_settings,
    fail,
    given,
)

settings_app = typer.Typer(
    help="Per-sender settings by calling AE title: completion signals, commitment reports."
)
Opt = typer.Option

ReportMode = Literal["same_association", "new_association", "same_then_new"]


def _print_setting(setting: SourceSetting) -> None:
    typer.echo(f"{setting.ae_title}")
    for name, value in setting.signals.model_dump().items():
        origin = setting.origin.get(f"{SIGNALS}.{name}", DEFAULT)
        typer.echo(f"  {SIGNALS}.{name:<21} {'on' if value else 'off':<22} ({origin})")
    if setting.report is None:
        typer.echo(f"  {REPORT:<28} none: its storage commitment requests are refused")
        return
    for name, value in setting.report.model_dump().items():
        origin = setting.origin.get(f"{REPORT}.{name}", DEFAULT)
        shown = "-" if value is None else str(value)
        typer.echo(f"  {REPORT}.{name:<11} {shown:<22} ({origin})")


@settings_app.command("list")
def settings_list(
    ctx: typer.Context, as_json: Annotated[bool, Opt("--json", help="JSON output")] = False
) -> None:
    """Every sender with a setting in the configuration file or the catalogue."""
    found = list_source_settings(context_catalogue(ctx), context_settings(ctx))
    if as_json:
        typer.echo(json.dumps([s.public() for s in found], indent=2))
        return
    table = Table("AE title", "association end", "instance count", "multi-frame", "reports")
    for setting in found:
        signals, report = setting.signals, setting.report
        where = "-"
        if report is not None:
            where = report.association
            if report.on_new_association:
                where += f" -> {report.ae_title or setting.ae_title}@"
                where += f"{report.host or '(its address)'}:{report.port}"
        table.add_row(
            setting.ae_title,
            "on" if signals.association_end else "off",
            "on" if signals.instance_count else "off",
            "on" if signals.multiframe else "off",
            where,
        )
    Console().print(table)


@settings_app.command("show")
def settings_show(
    ctx: typer.Context,
    ae_title: str,
    as_json: Annotated[bool, Opt("--json", help="JSON output")] = False,
) -> None:
    """One sender's settings, and where each value comes from."""
    try:
        setting = get_source_setting(context_catalogue(ctx), context_settings(ctx), ae_title)
    except SourceSettingsError as exc:
        raise fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(setting.public(), indent=2))
        return
    _print_setting(setting)


@settings_app.command("set")
def settings_set(
    ctx: typer.Context,
    ae_title: str,
    association_end: Annotated[
        bool | None,
        Opt("--association-end/--no-association-end", help="it sends a series per association"),
    ] = None,
    instance_count: Annotated[
        bool | None,
        Opt("--instance-count/--no-instance-count", help="it fills ImagesInAcquisition"),
    ] = None,
    multiframe: Annotated[
        bool | None,
        Opt("--multiframe/--no-multiframe", help="a full multi-frame stack is the series"),
    ] = None,
    report: Annotated[
        ReportMode | None, Opt("--commitment-report", help="which association carries reports")
    ] = None,
    report_host: Annotated[str | None, Opt(help="its host for reports (new association)")] = None,
    report_port: Annotated[int | None, Opt(help="its port for reports (new association)")] = None,
    report_ae_title: Annotated[str | None, Opt(help="its AE title for those reports")] = None,
) -> None:
    """Change some of a sender's settings (applies within a second, no restart)."""
    changes: dict[str, dict[str, Any]] = {}
    signals = given(
        association_end=association_end, instance_count=instance_count, multiframe=multiframe
    )
    if signals:
        changes[SIGNALS] = signals
    address = given(
        association=report, host=report_host, port=report_port, ae_title=report_ae_title
    )
    if address:
        changes[REPORT] = address
    if not changes:
        raise fail("nothing to change: give at least one option")
    try:
        setting = set_source_setting(
            context_catalogue(ctx), context_settings(ctx), ae_title, changes, cli_actor()
        )
    except SourceSettingsError as exc:
        raise fail(str(exc)) from exc
    _print_setting(setting)


@settings_app.command("reset")
def settings_reset(ctx: typer.Context, ae_title: str) -> None:
    """Forget what was set here for a sender: the configuration file's values apply."""
    try:
        setting = reset_source_setting(
            context_catalogue(ctx), context_settings(ctx), ae_title, cli_actor()
        )
    except SourceSettingsError as exc:
        raise fail(str(exc)) from exc
    _print_setting(setting)
