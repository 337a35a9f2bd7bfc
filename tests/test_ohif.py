"""A radiologist's view: the node's results of a real CT, opened in OHIF v3.

The node processes the sample CT with the demo heads and delivers its SRs and SEG to a
test Orthanc; the published OHIF viewer (tests/support/ohif.py) reads them from that Orthanc over
DICOMweb in headless Chromium. The test asserts what a radiologist would look for: the
finding's label drawn over the key slice, and the segmentation shown as an overlay.
Screenshots are kept in test-artifacts/ (and, with CURIA_SCREENSHOT=1, the README's).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from pipelines.reporting.measurement_groups import LABEL_SCHEME
from tests.support.env import node_env
from tests.support.ohif import OhifServer, fetch_ohif
from tests.support.peers import Orthanc, wait_for
from tests.support.results import EXPECTED, download_results, push_and_wait_for_sr
from tests.support.validators import assert_pixelmed_sr_clean

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
README_SCREENSHOT = REPO / "docs" / "ohif.png"


def _drawn_labels(sr_path: Path) -> list[tuple[str, float]]:
    """(label, value in %) of every measurement the SR draws on an image."""
    ds = dcmread(sr_path)
    found = []

    def walk(items) -> None:
        for item in items:
            concept = item.get("ConceptNameCodeSequence")
            if (
                item.ValueType == "NUM"
                and concept
                and concept[0].CodingSchemeDesignator == LABEL_SCHEME
                and any(c.ValueType == "SCOORD" for c in item.get("ContentSequence", []))
            ):
                value = float(item.MeasuredValueSequence[0].NumericValue)
                found.append((str(concept[0].CodeMeaning), value))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return found


def _coloured_share(png: bytes) -> float:
    """Share of pixels that are clearly coloured: a CT is grey, an overlay is not."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    return float((spread > 60).mean())


def _skip_tour(page) -> None:
    """Close the first-visit tour when it shows (it covers the image in screenshots)."""
    skip = page.get_by_role("button", name="Skip all")
    with contextlib.suppress(Exception):  # no tour this time
        skip.click(timeout=15_000)


@contextlib.contextmanager
def _shot_on_failure(page) -> Iterator[None]:
    """Keep what the viewer showed when an assertion failed."""
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ohif-failed.png"))
        raise


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.ohif
def test_radiologist_sees_the_finding_and_the_segmentation_in_ohif(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path, browser
) -> None:
    from playwright.sync_api import expect

    dist = fetch_ohif()
    node = node_factory(node_env(tmp_path, orthanc))
    push_and_wait_for_sr(orthanc, node, ct_series, tmp_path)  # results validated there
    study_uid = str(dcmread(ct_series[0], stop_before_pixels=True).StudyInstanceUID)
    results = download_results(orthanc, study_uid, tmp_path / "fetched", EXPECTED)
    for path in results["SR"]:
        assert_pixelmed_sr_clean(path)
    drawn = {path: _drawn_labels(path) for path in results["SR"]}
    # one SR draws every finding: the body region and the mask head's region
    [(report, labels)] = [(p, labels) for p, labels in drawn.items() if labels]
    assert [label for label, _ in labels][1] == "DEMO Segmented region probability"
    label, value = labels[0]
    assert label.startswith("DEMO ") and label.endswith(" probability"), label
    report_series = str(dcmread(report, stop_before_pixels=True).SeriesInstanceUID)
    seg = dcmread(results["SEG"][0], stop_before_pixels=True)
    ARTIFACTS.mkdir(exist_ok=True)

    expect.set_options(timeout=60_000)
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    with OhifServer(dist, orthanc.http_port) as viewer, _shot_on_failure(page):
        # The SR: the finding's label drawn next to its outline on the key slice.
        page.goto(viewer.viewer_url(study_uid, report_series))
        _skip_tour(page)
        drawn_label = page.locator("svg text", has_text=label)
        expect(drawn_label.first).to_be_visible()
        # OHIF writes "<concept name>: <value, 2 decimals> <unit>"
        assert drawn_label.first.text_content() == f"{label}: {value:.2f} %"
        page.screenshot(path=str(ARTIFACTS / "ohif-sr.png"))
        if os.environ.get("CURIA_SCREENSHOT"):
            page.screenshot(path=str(README_SCREENSHOT))
        # The next finding (the mask head's) is on its own key slice: the viewer's arrows.
        for other, other_value in labels[1:]:
            page.locator('[data-cy="viewport-action-arrows-right"]').click()
            shown = page.locator("svg text", has_text=other)
            expect(shown.first).to_contain_text(f"{other}: {other_value:.2f} %")
        page.screenshot(path=str(ARTIFACTS / "ohif-sr-mask-finding.png"))

        # The CT alone is grey: the baseline for the overlay check.
        page.goto(viewer.viewer_url(study_uid, str(dcmread(ct_series[0]).SeriesInstanceUID)))
        image = page.locator("canvas").first
        expect(image).to_be_visible()
        page.wait_for_timeout(3000)
        before = _coloured_share(image.screenshot())

        # The SEG: OHIF shows the segment over the CT and offers to load it.
        page.goto(viewer.viewer_url(study_uid, str(seg.SeriesInstanceUID)))
        _skip_tour(page)
        page.get_by_role("button", name="Yes").click()
        overlay = wait_for(
            lambda: (share := _coloured_share(image.screenshot())) > before + 0.02 and share,
            60,
            "no segmentation overlay on the image",
        )
        page.screenshot(path=str(ARTIFACTS / "ohif-seg.png"))
        # the viewport's frame and markers only, then the demo mask's large random region
        assert before < 0.02, f"{before:.1%} of the CT view coloured without the SEG"
        print(f"coloured share of the viewport: CT {before:.1%}, with the SEG {overlay:.1%}")
    context.close()
    assert not errors, errors
