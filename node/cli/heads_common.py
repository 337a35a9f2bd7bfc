"""What the `curia-node heads` commands share: the app, options, console and helpers.

The commands themselves live in :mod:`node.cli.heads` (list), :mod:`node.cli.heads_training`
(train, evaluate) and :mod:`node.cli.heads_import` (import); each registers on
:data:`heads_app`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from node.cli.options import ConfigOption, settings_or_exit

if TYPE_CHECKING:
    from node.core.settings import Settings
    from pipelines.model.backbone import Backbone

heads_app = typer.Typer(
    help="Heads: train linear heads on labelled series, evaluate them, import Raidium's.",
    no_args_is_help=True,
)

console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)

WeightsOption = Annotated[
    str | None,
    typer.Option(
        "--weights",
        help="Curia weights folder, or 'demo'; default: the configured weights (else demo)",
    ),
]
DeviceOption = Annotated[
    str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N (default: configured)")
]
CacheOption = Annotated[
    Path | None,
    typer.Option("--cache-dir", help="feature cache (default: DATA_DIR/.curia-features)"),
]
SliceBatchOption = Annotated[
    int | None, typer.Option("--slice-batch", min=1, help="slices per backbone batch")
]
ExistingDir = Annotated[Path, typer.Argument(exists=True, file_okay=False, dir_okay=True)]
LabelsOption = Annotated[
    Path,
    typer.Option("--labels", exists=True, dir_okay=False, help="CSV with columns series,label"),
]
CodesOption = Annotated[
    Path | None,
    typer.Option(
        "--codes", exists=True, dir_okay=False, help="CSV with columns label,value,scheme,meaning"
    ),
]


@heads_app.callback()
def heads_options(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Remember the config file; settings are read only by commands that need them."""
    ctx.obj = {"config": config}


def fail(message: str, code: int = 2) -> typer.Exit:
    errors.print(f"[red]error:[/red] {message}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def settings_of(ctx: typer.Context) -> Settings:
    if "settings" not in ctx.obj:
        ctx.obj["settings"] = settings_or_exit(ctx.obj.get("config"))
    settings: Settings = ctx.obj["settings"]
    return settings


def backbone_for(ctx: typer.Context, weights: str | None, device: str | None) -> Backbone:
    """The backbone heads are trained on: as given, else the node's own configured one."""
    from pipelines.model.backbone import WeightsError, demo_backbone, load_backbone
    from pipelines.model.inference import select_device

    settings = settings_of(ctx)
    try:
        resolved = select_device(device or settings.model.device)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    folder = settings.model.weights_dir if weights is None else weights
    if folder is None or str(folder) == "demo":
        if weights is None:
            errors.print(
                "[yellow]no weights configured: using DEMO weights; heads trained on them "
                "mean nothing (pass --weights FOLDER)[/yellow]",
                markup=True,
            )
        return demo_backbone(
            settings.model.demo_size,
            seed=settings.model.seed,
            device=resolved,
            precision=settings.model.precision,
        )
    try:
        return load_backbone(Path(folder), device=resolved, precision=settings.model.precision)
    except WeightsError as exc:
        raise fail(f"cannot load the Curia weights: {exc}", code=3) from exc


class ProgressBar:
    """A rich progress bar fed by the training code's progress hook."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("features", total=None)
        self.cached = 0

    def start(self, total: int) -> None:
        self.progress.update(self.task, total=total)

    def advance(self, name: str, cached: bool) -> None:
        self.cached += cached
        self.progress.update(
            self.task, advance=1, description=f"features ({self.cached} cached) {name}"
        )


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"


def training_errors() -> tuple[type[Exception], ...]:
    """What the training and import code raises for bad input (reported, not traced)."""
    from pipelines.model.heads import HeadError
    from pipelines.model.preprocess import SeriesError
    from pipelines.model.training import TrainingError

    return (TrainingError, HeadError, SeriesError)
