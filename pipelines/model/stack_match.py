"""Which heads run on which stack: the plane, modality and slice count each card accepts.

A head card states the patient planes it reads (axial unless it says otherwise), the
modalities (any when it names none) and the fewest slices a stack must have. A stack
that no head accepts is not analysed, with a reason a radiologist or an administrator
understands ("sagittal stack, every head is axial-only", "3 slices, heads need 20").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from pipelines.model.orientation import Plane
from pipelines.model.series_plan import SeriesPlan


class StackRequirements(Protocol):
    """What a head card (classification or mask) says about the stacks it reads."""

    @property
    def modalities(self) -> list[str]: ...

    @property
    def planes(self) -> list[Plane]: ...

    @property
    def min_slices(self) -> int: ...


class HasCard(Protocol):
    @property
    def card(self) -> StackRequirements: ...


H = TypeVar("H", bound=HasCard)


def accepts(card: StackRequirements, plan: SeriesPlan) -> bool:
    modality = plan.modality.upper()
    return (
        (not card.modalities or modality in [m.upper() for m in card.modalities])
        and plan.plane in card.planes
        and len(plan) >= card.min_slices
    )


def heads_for_stack(heads: Sequence[H], plan: SeriesPlan) -> list[H]:
    """The heads whose card accepts this stack, in their order."""
    return [head for head in heads if accepts(head.card, plan)]


def why_not(cards: Sequence[StackRequirements], plan: SeriesPlan) -> str:
    """Why no card accepts the stack: the first requirement that rules every head out.

    Checked in the order a reader looks: modality, then plane, then slice count; among
    the heads that pass the earlier checks.
    """
    if not cards:
        return "no head is installed"
    modality = plan.modality.upper() or "no modality"
    fitting = [c for c in cards if not c.modalities or modality in map(str.upper, c.modalities)]
    if not fitting:
        wanted = sorted({m.upper() for c in cards for m in c.modalities})
        return f"{modality} stack, every head reads {'/'.join(wanted)}"
    in_plane = [c for c in fitting if plan.plane in c.planes]
    if not in_plane:
        planes = sorted({p for c in fitting for p in c.planes})
        only = "-only" if len(planes) == 1 else ""
        return f"{plan.plane} stack, every head is {'/'.join(planes)}{only}"
    need = min(c.min_slices for c in in_plane)
    return f"{len(plan)} slice{'s' if len(plan) != 1 else ''}, heads need {need}"
