"""pydicom's per-file warnings reach the node log summarised, not once per file."""

from __future__ import annotations

import logging
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian

from node.core.logs import RepeatedWarnings, summarise_library_warnings, warnings_summarised


def _mislabelled(n: int) -> list[bytes]:
    """Explicit VR files whose file meta says implicit VR, as one scanner writes them."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    explicit = str(ds.file_meta.TransferSyntaxUID).encode()
    implicit = str(ImplicitVRLittleEndian).encode()
    patched = data.replace(
        explicit + b"\0" * (len(explicit) % 2),
        implicit.ljust(len(explicit) + len(explicit) % 2, b"\0"),
        1,
    )
    return [patched] * n


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_series_of_mislabelled_files_logs_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    summarise_library_warnings()
    files = _mislabelled(5)
    with caplog.at_level(logging.WARNING, logger="pydicom"), warnings_summarised("series 7"):
        for data in files:
            dcmread(BytesIO(data))
    lines = [r.getMessage() for r in caplog.records if r.name == "pydicom"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("series 7: Expected") and "(5 file(s))" in lines[0]


def test_outside_a_series_a_repeated_warning_is_logged_once_then_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("curia.test.repeated")
    logger.addFilter(summary := RepeatedWarnings(interval=0.05))
    try:
        with caplog.at_level(logging.WARNING, logger=logger.name):
            for _ in range(4):
                logger.warning("Expected implicit VR, but found explicit VR")
            summary.interval = 0.0
            logger.warning("Expected implicit VR, but found explicit VR")
    finally:
        logger.removeFilter(summary)
    lines = [r.getMessage() for r in caplog.records if r.name == logger.name]
    assert lines == [
        "Expected implicit VR, but found explicit VR",
        "Expected implicit VR, but found explicit VR (and 3 time(s) more before)",
    ]
