"""`curia-node heads import`: one of Raidium's released head folders as a node head."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from node.cli.heads_common import (
    CodesOption,
    ExistingDir,
    console,
    fail,
    heads_app,
    settings_of,
    training_errors,
)

if TYPE_CHECKING:
    from pipelines.model.orientation import Plane

#: The patient planes a card may name, in the order a card lists them.
PLANES = ("axial", "coronal", "sagittal")


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
    mask_segment: Annotated[
        str | None,
        typer.Option(
            "--mask-segment",
            help="mask heads: pool in this segment (label) of a SEG or RTSTRUCT sent with "
            "the study, instead of a mask head's mask",
        ),
    ] = None,
    planes: Annotated[
        str | None,
        typer.Option(
            "--planes", help="planes of the stacks it reads: axial,coronal,sagittal (default axial)"
        ),
    ] = None,
    modalities: Annotated[
        str | None,
        typer.Option("--modalities", help="modalities it reads, e.g. CT,MR (default: any)"),
    ] = None,
    min_slices: Annotated[
        int | None,
        typer.Option("--min-slices", min=1, help="fewest slices a stack must have (default 1)"),
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
    from pipelines.model.head_card import SegmentRef
    from pipelines.model.head_import import import_raidium_head
    from pipelines.model.heads import CARD_FILE
    from pipelines.model.training import read_codes

    failure = training_errors()
    names = _listed(classes)
    if mask_source is not None and mask_segment is not None:
        raise fail("give --mask-source (a mask head) or --mask-segment (a segment), not both")
    plane_list = _planes(planes)
    target = out / name
    if (target / CARD_FILE).exists() and not overwrite:
        raise fail(f"{target}: a head package is already there (--overwrite to replace)")
    try:
        code_map = read_codes(codes) if codes else {}
    except failure as exc:
        raise fail(str(exc)) from exc
    unknown = sorted(set(code_map) - set(names))
    if unknown:
        raise fail(f"{codes}: codes for labels that are not classes: {unknown}")
    reference = backbone if backbone is not None else settings_of(ctx).model.weights_dir
    recorded = backbone_name
    if recorded is None and reference is not None:
        try:
            recorded = load_backbone(Path(reference)).identity.name
        except WeightsError as exc:
            raise fail(f"cannot load the Curia weights: {exc}", code=3) from exc
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
            mask_source=SegmentRef(segment=mask_segment) if mask_segment else mask_source,
            processor=processor,
            final_norm=None if token_source is None else token_source == "final_norm",
            planes=plane_list,
            modalities=None if modalities is None else _listed(modalities),
            min_slices=min_slices,
        )
    except failure as exc:
        raise fail(str(exc)) from exc
    card = head.card
    record = card.imported
    console.print(f"imported {folder.name} as {card.name} ({card.task}, pooling {card.pooling})")
    if card.aggregation is not None:
        console.print(f"per-slice scores aggregated by {card.aggregation}")
    console.print(
        f"reads {', '.join(card.planes)} stacks of "
        f"{', '.join(card.modalities) or 'any modality'}, at least {card.min_slices} slice(s)"
    )
    if card.mask_source is not None:
        source = card.segment_source
        console.print(
            f"mask: segment {source.describe()!r} of the study's SEG or RTSTRUCT"
            if source is not None
            else f"mask: mask head {card.mask_head}"
        )
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


def _listed(text: str) -> list[str]:
    """A comma-separated option as its non-blank items."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _planes(text: str | None) -> list[Plane] | None:
    """``--planes`` checked: each of axial, coronal, sagittal."""
    if text is None:
        return None
    given = [p.lower() for p in _listed(text)]
    unknown = [p for p in given if p not in PLANES]
    if unknown or not given:
        raise fail(f"--planes: {', '.join(unknown) or 'none given'}; use {', '.join(PLANES)}")
    return [p for p in PLANES if p in given]  # type: ignore[misc]
