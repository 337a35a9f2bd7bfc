"""`curia-node heads train` and `heads evaluate`: linear heads on labelled series."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.table import Table

from node.cli.heads_common import (
    CacheOption,
    CodesOption,
    DeviceOption,
    ExistingDir,
    LabelsOption,
    ProgressBar,
    SliceBatchOption,
    WeightsOption,
    backbone_for,
    console,
    fail,
    heads_app,
    number,
    progress_bar,
    settings_of,
    training_errors,
)

if TYPE_CHECKING:
    from pipelines.model.training import CrossValidation


def _validation_table(validation: CrossValidation) -> Table:
    names = list(validation.mean)
    table = Table(title=f"{len(validation.folds)}-fold cross-validation")
    table.add_column("fold")
    table.add_column("series", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for i, row in enumerate(validation.folds, start=1):
        table.add_row(str(i), str(int(row["series"])), *(number(row[n]) for n in names))
    table.add_section()
    table.add_row(
        "mean ± sd",
        "",
        *(f"{number(validation.mean[n])} ± {number(validation.std[n])}" for n in names),
    )
    table.add_row("pooled", "", *(number(validation.pooled[n]) for n in names))
    return table


@heads_app.command()
def train(
    ctx: typer.Context,
    data_dir: ExistingDir,
    labels: LabelsOption,
    name: Annotated[str, typer.Option("--name", help="head name (package folder name)")],
    out: Annotated[Path, typer.Option("--out", help="heads folder to write NAME/ into")],
    weights: WeightsOption = None,
    folds: Annotated[int, typer.Option("--folds", min=0, help="k-fold CV; 0 skips it")] = 5,
    task: Annotated[
        Literal["classification", "regression"], typer.Option("--task")
    ] = "classification",
    pooling: Annotated[str, typer.Option("--pooling", help="only mean_cls is trained")] = (
        "mean_cls"
    ),
    codes: CodesOption = None,
    quantity: Annotated[
        str | None, typer.Option("--quantity", help="regression: the quantity's name")
    ] = None,
    version: Annotated[str, typer.Option("--version")] = "1.0.0",
    description: Annotated[str, typer.Option("--description")] = "",
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="probe batch")] = 64,
    lr: Annotated[
        float, typer.Option("--lr", min=0.0, help="base learning rate, x batch/256")
    ] = 0.01,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    clip_below_air: Annotated[
        bool, typer.Option("--clip-below-air", help="clamp values below -1000 first")
    ] = False,
    cache_dir: CacheOption = None,
    slice_batch: SliceBatchOption = None,
    device: DeviceOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace NAME if present")] = False,
) -> None:
    """Train a linear head on labelled series: k-fold metrics, then a head fitted on all."""
    from pipelines.model.training import Recipe, read_codes, train_head

    failure = training_errors()
    try:
        recipe = Recipe(epochs=epochs, batch_size=batch_size, learning_rate=lr, seed=seed)
        code_map = read_codes(codes) if codes else None
    except failure as exc:
        raise fail(str(exc)) from exc
    backbone = backbone_for(ctx, weights, device)
    console.print(f"backbone: {backbone.identity.name} ({backbone.identity.version})")
    try:
        with progress_bar() as progress:
            result = train_head(
                data_dir,
                labels,
                name=name,
                heads_dir=out,
                backbone=backbone,
                task=task,
                pooling=pooling,
                folds=folds,
                recipe=recipe,
                codes=code_map,
                quantity=quantity,
                version=version,
                description=description,
                clip_below_air=clip_below_air,
                cache_dir=cache_dir,
                batch_size=slice_batch or settings_of(ctx).model.batch_size,
                overwrite=overwrite,
                progress=ProgressBar(progress),
            )
    except failure as exc:
        raise fail(str(exc)) from exc
    data = result.data
    for note in data.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(
        f"{len(data.sources)} series, {data.cached} features from the cache, "
        f"{len(data.sources) - data.cached} computed"
    )
    if result.validation is not None:
        console.print(_validation_table(result.validation))
    classes = ", ".join(c.name for c in result.head.card.classes)
    console.print(f"wrote head {name} ({task}: {classes}) to {result.folder}")


@heads_app.command()
def evaluate(
    ctx: typer.Context,
    head_dir: ExistingDir,
    data_dir: ExistingDir,
    labels: LabelsOption,
    weights: WeightsOption = None,
    cache_dir: CacheOption = None,
    slice_batch: SliceBatchOption = None,
    device: DeviceOption = None,
) -> None:
    """Print an existing head's metrics on labelled series."""
    from pipelines.model.heads import load_head
    from pipelines.model.training import evaluate_head

    failure = training_errors()
    try:
        head = load_head(head_dir)
    except failure as exc:
        raise fail(str(exc)) from exc
    backbone = backbone_for(ctx, weights, device)
    digest = head.card.backbone_digest
    if digest and digest != backbone.identity.weights_digest:
        console.print(
            f"[yellow]note:[/yellow] head {head.name} was trained on other weights "
            f"({head.card.backbone}) than {backbone.identity.name}"
        )
    try:
        with progress_bar() as progress:
            evaluation = evaluate_head(
                head,
                data_dir,
                labels,
                backbone,
                cache_dir=cache_dir,
                batch_size=slice_batch or settings_of(ctx).model.batch_size,
                progress=ProgressBar(progress),
            )
    except failure as exc:
        raise fail(str(exc)) from exc
    for note in evaluation.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    table = Table(title=f"{head.name} {head.card.version} on {len(evaluation.series)} series")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for metric, value in evaluation.metrics.items():
        table.add_row(metric, number(value))
    console.print(table)
