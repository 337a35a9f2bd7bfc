"""The SR's document-level notes: the demo statement, per-head summaries, what was not
analysed (heads that did not run, stacks set aside), what it supersedes.

They are free text in one TID 1500 row 12 container directly under the report root, where
text viewers show them first (see :func:`document_notes` for why exactly there).
"""

from __future__ import annotations

from collections.abc import Mapping

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipelines.findings import HeadFinding, SeriesFindings
from pipelines.reporting.content import DEMO_STATEMENT, concept
from pipelines.reporting.measurement_groups import placeholders
from pipelines.reporting.templates import ReportTemplate

__all__ = ["document_notes"]

# TID 1500 row 12 container for document-level qualitative evaluations; pydicom's code
# dictionary has no entry for it.
_QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")


def _summary(finding: HeadFinding, template: ReportTemplate) -> str | None:
    if template.summary is None:
        return None
    return template.summary.pattern.format(**placeholders(finding, template))


def document_notes(
    findings: SeriesFindings,
    templates: Mapping[str, ReportTemplate],
    demo: bool,
    supersedes_uid: str | None,
) -> hd.sr.ContainerContentItem | None:
    """TID 1500 row 12 "Qualitative Evaluations" container with the free-text notes.

    Placement of the demo statement: a TEXT (121106, DCM, "Comment") in this
    document-level container (TID 1500 rows 12 + 14, "TEXT, any concept"). It sits
    directly under the report root, where dsr2html and text viewers show it first,
    and dciodvfy, dsrdump and PixelMed's DicomSRValidator (-checktemplateid
    -checkcontentitemorder) all accept it with no error and no warning. The same TEXT
    inside the TID 1501 group also passes, but PixelMed then warns "Content Item not in
    template". The per-head summaries (template pattern) go in the same container; the
    demo flag is repeated in each group's Algorithm Parameters (TID 4019) and in the
    SeriesDescription.
    """
    items: list[hd.sr.TextContentItem] = []
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    if demo:
        items.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment, value=DEMO_STATEMENT, relationship_type=contains
            )
        )
    for finding in findings.findings:
        template = templates[finding.head_name]
        text = _summary(finding, template)
        if text is not None and template.summary is not None:
            items.append(
                hd.sr.TextContentItem(
                    name=concept(template.summary.concept), value=text, relationship_type=contains
                )
            )
    for head_name, reason in sorted(findings.heads_not_run.items()):
        # a head that could not run (e.g. no mask to pool in) is stated, not left out silently
        items.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment, value=f"{head_name}: {reason}", relationship_type=contains
            )
        )
    for set_aside in findings.set_aside:
        # so is a stack or object of the series that no head read (a localizer, a sagittal
        # stack when the heads are axial-only), next to the stacks that were analysed
        items.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=f"Not analysed: {set_aside}",
                relationship_type=contains,
            )
        )
    if supersedes_uid is not None:
        items.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=f"Supersedes the earlier result SR with SOP Instance UID {supersedes_uid}.",
                relationship_type=contains,
            )
        )
    if not items:
        return None
    container = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS, relationship_type=contains
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container
