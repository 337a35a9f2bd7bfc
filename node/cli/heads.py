"""`curia-node heads ...`: train, evaluate, import and list classification heads."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from node.cli.options import ConfigOption, settings_or_exit

if TYPE_CHECKING:
    from node.core.settings import Settings
    from pipelines.model.backbone import Backbone
    from pipelines.model.heads import Head
    from pipelines.model.training import CrossValidation

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


def _fail(message: str, code: int = 2) -> typer.Exit:
    errors.print(f"[red]error:[/red] {message}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def _settings(ctx: typer.Context) -> Settings:
    if "settings" not in ctx.obj:
        ctx.obj["settings"] = settings_or_exit(ctx.obj.get("config"))
    settings: Settings = ctx.obj["settings"]
    return settings


def _backbone(ctx: typer.Context, weights: str | None, device: str | None) -> Backbone:
    """The backbone heads are trained on: as given, else the node's own configured one."""
    from pipelines.model.backbone import WeightsError, demo_backbone, load_backbone
    from pipelines.model.inference import select_device

    settings = _settings(ctx)
    try:
        resolved = select_device(device or settings.model.device)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
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
        raise _fail(f"cannot load the Curia weights: {exc}", code=3) from exc


class _Bar:
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


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"


def _validation_table(validation: CrossValidation) -> Table:
    names = list(validation.mean)
    table = Table(title=f"{len(validation.folds)}-fold cross-validation")
    table.add_column("fold")
    table.add_column("series", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for i, row in enumerate(validation.folds, start=1):
        table.add_row(str(i), str(int(row["series"])), *(_number(row[n]) for n in names))
    table.add_section()
    table.add_row(
        "mean ± sd",
        "",
        *(f"{_number(validation.mean[n])} ± {_number(validation.std[n])}" for n in names),
    )
    table.add_row("pooled", "", *(_number(validation.pooled[n]) for n in names))
    return table


def _training_error() -> tuple[type[Exception], ...]:
    """What the training and import code raises for bad input (reported, not traced)."""
    from pipelines.model.heads import HeadError
    from pipelines.model.preprocess import SeriesError
    from pipelines.model.training import TrainingError

    return (TrainingError, HeadError, SeriesError)


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

    failure = _training_error()
    try:
        recipe = Recipe(epochs=epochs, batch_size=batch_size, learning_rate=lr, seed=seed)
        code_map = read_codes(codes) if codes else None
    except failure as exc:
        raise _fail(str(exc)) from exc
    backbone = _backbone(ctx, weights, device)
    console.print(f"backbone: {backbone.identity.name} ({backbone.identity.version})")
    try:
        with _progress() as progress:
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
                batch_size=slice_batch or _settings(ctx).model.batch_size,
                overwrite=overwrite,
                progress=_Bar(progress),
            )
    except failure as exc:
        raise _fail(str(exc)) from exc
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

    failure = _training_error()
    try:
        head = load_head(head_dir)
    except failure as exc:
        raise _fail(str(exc)) from exc
    backbone = _backbone(ctx, weights, device)
    digest = head.card.backbone_digest
    if digest and digest != backbone.identity.weights_digest:
        console.print(
            f"[yellow]note:[/yellow] head {head.name} was trained on other weights "
            f"({head.card.backbone}) than {backbone.identity.name}"
        )
    try:
        with _progress() as progress:
            evaluation = evaluate_head(
                head,
                data_dir,
                labels,
                backbone,
                cache_dir=cache_dir,
                batch_size=slice_batch or _settings(ctx).model.batch_size,
                progress=_Bar(progress),
            )
    except failure as exc:
        raise _fail(str(exc)) from exc
    for note in evaluation.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    table = Table(title=f"{head.name} {head.card.version} on {len(evaluation.series)} series")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for metric, value in evaluation.metrics.items():
        table.add_row(metric, _number(value))
    console.print(table)


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
        model = _settings(ctx).model
        folders = [f for f in (model.heads_dir, model.mask_heads_dir) if f is not None]
    if not folders:
        console.print("no heads folder configured: the node runs its built-in demo heads")
        table.add_row(*_head_row(demo_head(768)))
        console.print(table)
        return
    broken: list[str] = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise _fail(f"{folder}: heads folder does not exist")
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
        raise _fail(f"{len(broken)} head package(s) cannot be loaded", code=1)


@heads_app.command("import")
def import_head(
    ctx: typer.Context,
    folder: ExistingDir,
    name: Annotated[str, typer.Option("--name", help="head name (package folder name)")],
    classes: Annotated[
        str, typer.Option("--classes", help="class names in output order, comma-separated")
    ],
    out: Annotated[Path, typer.Option("--out", help="heads folder to write NAME/ into")],
    codes: CodesOption = None,
    backbone: Annotated[
        Path | None,
        typer.Option(
            "--backbone",
            exists=True,
            file_okay=False,
            help="backbone folder to check the head's copy against (default: configured)",
        ),
    ] = None,
    backbone_name: Annotated[
        str | None, typer.Option("--backbone-name", help="name recorded on the card")
    ] = None,
    version: Annotated[str, typer.Option("--version")] = "1.0.0",
    description: Annotated[str, typer.Option("--description")] = "",
    clip_below_air: Annotated[
        bool | None,
        typer.Option(
            "--clip-below-air/--no-clip-below-air",
            help="clamp below -1000 (default: as the backbone's preprocessor_config.json)",
        ),
    ] = None,
    pooling: Annotated[
        Literal["slice", "mask", "mean_cls"] | None,
        typer.Option(
            "--pooling",
            help="2D heads: slice (per-slice CLS, default), mask (patch tokens in a mask), "
            "mean_cls (series-mean CLS)",
        ),
    ] = None,
    aggregation: Annotated[
        Literal["max", "mean", "top_k_mean"] | None,
        typer.Option("--aggregation", help="per-slice heads: max (default) | mean | top_k_mean"),
    ] = None,
    top_k: Annotated[
        int | None, typer.Option("--top-k", min=1, help="slices averaged by top_k_mean")
    ] = None,
    negative_class: Annotated[
        str | None,
        typer.Option("--negative-class", help="per-slice heads: the 'nothing found' class"),
    ] = None,
    mask_source: Annotated[
        str | None, typer.Option("--mask-source", help="mask heads: the mask head to pool in")
    ] = None,
    processor: Annotated[
        Literal["slice", "volume"] | None,
        typer.Option(
            "--processor",
            help="normalisation the head was trained with: slice (per-slice z-score) or "
            "volume (older processor); default: the backbone's",
        ),
    ] = None,
    token_source: Annotated[
        Literal["pre_norm", "final_norm"] | None,
        typer.Option("--token-source", help="3D heads: tokens before (default) or after norm"),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
) -> None:
    """Import one of Raidium's released head folders (config.json + model.safetensors)."""
    from pipelines.model.backbone import WeightsError, load_backbone
    from pipelines.model.head_import import import_raidium_head
    from pipelines.model.heads import CARD_FILE
    from pipelines.model.training import read_codes

    failure = _training_error()
    names = [c.strip() for c in classes.split(",") if c.strip()]
    target = out / name
    if (target / CARD_FILE).exists() and not overwrite:
        raise _fail(f"{target}: a head package is already there (--overwrite to replace)")
    try:
        code_map = read_codes(codes) if codes else {}
    except failure as exc:
        raise _fail(str(exc)) from exc
    unknown = sorted(set(code_map) - set(names))
    if unknown:
        raise _fail(f"{codes}: codes for labels that are not classes: {unknown}")
    reference = backbone if backbone is not None else _settings(ctx).model.weights_dir
    recorded = backbone_name
    if recorded is None and reference is not None:
        try:
            recorded = load_backbone(Path(reference)).identity.name
        except WeightsError as exc:
            raise _fail(f"cannot load the Curia weights: {exc}", code=3) from exc
    try:
        head = import_raidium_head(
            folder,
            target,
            name=name,
            classes=[(n, code_map.get(n)) for n in names],
            version=version,
            backbone_name=recorded or "Curia-B",
            backbone_folder=Path(reference) if reference is not None else None,
            description=description,
            clip_below_air=clip_below_air,
            pooling=pooling,
            aggregation=aggregation,
            top_k=top_k,
            negative_class=negative_class,
            mask_source=mask_source,
            processor=processor,
            final_norm=None if token_source is None else token_source == "final_norm",
        )
    except failure as exc:
        raise _fail(str(exc)) from exc
    card = head.card
    record = card.imported
    console.print(f"imported {folder.name} as {card.name} ({card.task}, pooling {card.pooling})")
    if card.aggregation is not None:
        console.print(f"per-slice scores aggregated by {card.aggregation}")
    if card.window is not None:
        window = card.window
        console.print(
            f"window: {window.num_slices or 'all'} slices ({window.selection}), "
            f"tokens {window.tokens}"
        )
    if record is not None:
        if record.backbone_match is True:
            console.print(f"backbone copy matches {record.backbone_checked_against}")
        elif record.backbone_match is False:
            console.print(
                f"[yellow]backbone copy differs from {record.backbone_checked_against}[/yellow]"
            )
        elif record.backbone_copy:
            console.print("backbone copy present, not checked (pass --backbone FOLDER)")
        for note in record.notes:
            console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"wrote {target}")
