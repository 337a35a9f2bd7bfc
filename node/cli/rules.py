"""`curia-node rules ...`: the routing rules, checked before they are put in force."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from node.catalogue.db import Catalogue
from node.cli.options import ConfigOption, cli_actor, fail, open_catalogue, settings_or_exit
from node.core.rules import RulesError, parse_rules
from node.core.settings import Settings
from node.core.uids import validate_uid
from node.delivery.destinations import list_destinations
from node.workflow.routing import active_rules, dry_run, save_rules

rules_app = typer.Typer(help="Routing rules: show, check, put in force, dry-run on a study.")
RulesFile = Annotated[Path, typer.Argument(help="a YAML rule set", exists=True, dir_okay=False)]


@rules_app.callback()
def rules_options(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Load the settings once for every `rules` command."""
    settings = settings_or_exit(config)
    ctx.obj = {"settings": settings, "catalogue": open_catalogue(settings)}


def _known(ctx: typer.Context) -> list[str]:
    settings: Settings = ctx.obj["settings"]
    return [d.name for d in list_destinations(ctx.obj["catalogue"], settings)]


@rules_app.command("show")
def show(ctx: typer.Context) -> None:
    """Print the rule set in force (YAML), and who put it there."""
    active = active_rules(ctx.obj["catalogue"])
    if active.id is None:
        typer.echo("# no routing rules yet: every series is analysed, results go to every")
        typer.echo("# destination marked 'results'")
        return
    typer.echo(f"# version {active.id}, by {active.created_by} at {active.created_at}")
    typer.echo(active.document)


@rules_app.command("check")
def check(ctx: typer.Context, path: RulesFile) -> None:
    """Validate a rule file (syntax, fields, destinations) without putting it in force."""
    try:
        rules = parse_rules(path.read_text(), _known(ctx))
    except RulesError as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"ok: {len(rules.rules)} rule(s), fallback {'set' if rules.fallback else 'none'}")


@rules_app.command("set")
def set_(ctx: typer.Context, path: RulesFile) -> None:
    """Put a rule file in force (a new version; the next completed series uses it)."""
    catalogue: Catalogue = ctx.obj["catalogue"]
    try:
        active = save_rules(catalogue, path.read_text(), cli_actor(), _known(ctx))
    except RulesError as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"rules version {active.id} in force ({len(active.rules.rules)} rule(s))")


@rules_app.command("test")
def test(
    ctx: typer.Context,
    study_uid: Annotated[str, typer.Argument(help="StudyInstanceUID of a stored study")],
    path: Annotated[
        Path | None, typer.Option("--rules", help="try this file instead of the rules in force")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Dry-run the rules on a stored study: which rules fire, and why. Changes nothing."""
    settings: Settings = ctx.obj["settings"]
    try:
        validate_uid(study_uid, "StudyInstanceUID")
        rules = parse_rules(path.read_text(), _known(ctx)) if path else None
        report = dry_run(ctx.obj["catalogue"], settings.spool_dir, study_uid, rules)
    except (RulesError, ValueError, LookupError) as exc:
        raise fail(str(exc).strip("'\"")) from exc
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for item in report:
        decision = item["decision"]
        typer.echo(
            f"series {item['series_instance_uid']} ({item['modality']}, "
            f"{item['instances']} instances): {decision['phase']} known"
        )
        for outcome in decision["outcomes"]:
            typer.echo(f"  {outcome['state']:>18}  {outcome['rule']}")
            for reason in outcome["reasons"]:
                typer.echo(f"{'':22}{reason}")
        actions = {
            "heads": decision["heads"] or "all",
            "priority": decision["priority_name"],
            "discard": decision["discard"],
            "forward": sorted(decision["forward"]) or "-",
            "results also to": sorted(decision["results_to"]) or "-",
        }
        if decision["fallback_used"]:
            actions["fallback"] = "used"
        typer.echo("  => " + ", ".join(f"{k}: {v}" for k, v in actions.items()))
