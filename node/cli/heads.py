"""`curia-node heads ...`: train, evaluate, import and list classification heads.

This module holds ``heads list`` and gathers the other commands (their modules register on
the shared app when imported here): :mod:`node.cli.heads_training` (train, evaluate) and
:mod:`node.cli.heads_import` (import).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.table import Table

from node.cli import heads_import, heads_training
from node.cli.heads_common import console, errors, fail, heads_app, settings_of

if TYPE_CHECKING:
    from pipelines.model.heads import Head

__all__ = ["heads_app", "heads_import", "heads_training"]


def _head_row(head: Head) -> list[str]:
    card = head.card
    classes = ", ".join(c.name for c in card.classes)
    if len(classes) > 60:
        classes = classes[:57] + "..."
    return [
        card.name,
        card.version,
        f"{card.task}\n{card.pooling}",
        f"{len(card.classes)}: {classes}",
        card.backbone,
        "yes" if card.demo else "",
    ]


def _mask_row(package: Path) -> list[str]:
    """A mask head (task segmentation) shares the package layout; show it alongside."""
    from pipelines.model.masks import load_mask_head

    card = load_mask_head(package).card
    return [
        card.name,
        card.version,
        f"{card.task}\npatch tokens",
        f"segment: {card.segment.label}",
        card.backbone,
        "yes" if card.demo else "",
    ]


def _package_row(package: Path) -> list[str]:
    from pipelines.model.heads import CARD_FILE, load_head

    try:
        task = json.loads((package / CARD_FILE).read_text(encoding="utf-8")).get("task")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        task = None
    if task == "segmentation":
        return _mask_row(package)
    return _head_row(load_head(package))


@heads_app.command("list")
def list_heads(
    ctx: typer.Context,
    heads_dir: Annotated[
        Path | None,
        typer.Argument(help="heads folder (default: the configured heads and mask heads)"),
    ] = None,
) -> None:
    """Show the installed heads: name, version, task, classes, backbone, demo flag."""
    from pipelines.findings import SegmentationError
    from pipelines.model.heads import CARD_FILE, HeadError, demo_head

    table = Table(title="heads", box=box.SIMPLE_HEAD)
    for column in ("name", "version", "task / pooling", "classes", "backbone", "demo"):
        fixed = column in ("task / pooling", "demo")  # short: never wrapped
        table.add_column(column, overflow="fold", no_wrap=fixed, min_width=len(column))
    if heads_dir is not None:
        folders = [heads_dir]
    else:
        model = settings_of(ctx).model
        folders = [f for f in (model.heads_dir, model.mask_heads_dir) if f is not None]
    if not folders:
        console.print("no heads folder configured: the node runs its built-in demo heads")
        table.add_row(*_head_row(demo_head(768)))
        console.print(table)
        return
    broken: list[str] = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise fail(f"{folder}: heads folder does not exist")
        for package in sorted(p for p in Path(folder).iterdir() if (p / CARD_FILE).is_file()):
            try:
                table.add_row(*_package_row(package))
            except (HeadError, SegmentationError) as exc:
                broken.append(str(exc))
                table.add_row(package.name, "", "[red]cannot load[/red]", "", "", "")
    console.print(table)
    for problem in broken:
        errors.print(f"[red]{problem}[/red]", markup=True, soft_wrap=True)
    if broken:
        raise fail(f"{len(broken)} head package(s) cannot be loaded", code=1)
