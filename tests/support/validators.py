"""Run the standard DICOM validators on files the node writes, as test assertions.

Shared by unit and end-to-end tests so that every object the node sends to an archive
is checked the same way. Each ``assert_*`` fails the calling test (naming the tool)
when the tool is not installed, and fails with the offending lines otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path

import pytest

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
# Java 17's XPath limits are too small for PixelMed's compiled SR templates.
_JAVA_XPATH_FLAGS = (
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
)
_TIMEOUT_S = 300

PathArg = str | PathLike[str]


def _require(tool: str) -> str:
    """The tool's path; a missing validator fails the test (``make test`` installs them)."""
    exe = shutil.which(tool)
    if exe is None:
        pytest.fail(f"{tool} is not installed: run the README's test command (it installs it)")
    return exe


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
    )


def _bad_lines(output: str, is_bad: Callable[[str], bool]) -> list[str]:
    return [line for line in output.splitlines() if is_bad(line)]


def _fail(tool: str, target: str, bad: list[str], output: str) -> None:
    listing = "\n".join(bad)
    lines = output.splitlines()
    if len(lines) > 200:  # PixelMed's -describe trace runs to thousands of lines
        output = "\n".join(line for line in lines if line.startswith(("Error", "Warning")))
    pytest.fail(
        f"{tool} reports problems in {target}:\n{listing}\n--- full output ---\n{output}",
        pytrace=False,
    )


def warnings_of(output: str, prefix: str = "Warning") -> list[str]:
    """Warning lines of a validator's output, for tests that want to report or cap them."""
    return [line for line in output.splitlines() if line.startswith(prefix)]


def assert_dciodvfy_clean(path: PathArg) -> str:
    """dciodvfy (dicom3tools) IOD check: no line starting with "Error". Returns the output."""
    exe = _require("dciodvfy")
    proc = _run([exe, "-new", str(path)])
    output = proc.stdout + proc.stderr
    bad = _bad_lines(output, lambda line: line.startswith("Error"))
    if bad:
        _fail("dciodvfy", str(path), bad, output)
    return output


def assert_dsrdump_clean(path: PathArg) -> str:
    """dsrdump (DCMTK) parses the SR tree: exit 0 and no "E:"/"F:" lines. Returns the dump."""
    exe = _require("dsrdump")
    proc = _run([exe, str(path)])
    output = proc.stdout + proc.stderr
    bad = _bad_lines(output, lambda line: line.startswith(("E:", "F:")))
    if proc.returncode != 0:
        bad.append(f"exit status {proc.returncode}")
    if bad:
        _fail("dsrdump", str(path), bad, output)
    return output


def assert_pixelmed_sr_clean(path: PathArg) -> str:
    """PixelMed DicomSRValidator with template checks: no "Error:" lines. Returns the output."""
    java = _require("java")
    if not PIXELMED_JAR.is_file():
        pytest.fail(f"PixelMed ({PIXELMED_JAR}) is not installed: apt-get install pixelmed-apps")
    proc = _run(
        [
            java,
            *_JAVA_XPATH_FLAGS,
            "-cp",
            str(PIXELMED_JAR),
            "com.pixelmed.validate.DicomSRValidator",
            "-describe",
            "-checkcontentitemorder",
            "-checktemplateid",
            str(path),
        ]
    )
    output = proc.stdout + proc.stderr
    bad = _bad_lines(output, lambda line: line.startswith("Error:"))
    # A crash (e.g. an XPath limit) prints no "Error:" line but validates nothing.
    completed = "IOD validation complete" in output
    if proc.returncode != 0 or "Exception" in output or not completed:
        bad.append(f"validator did not complete (exit status {proc.returncode})")
    if bad:
        _fail("PixelMed DicomSRValidator", str(path), bad, output)
    return output


def assert_dcentvfy_clean(sources: Sequence[PathArg], results: Sequence[PathArg]) -> str:
    """dcentvfy: patient/study/series entities consistent across sources and results."""
    exe = _require("dcentvfy")
    files = [str(p) for p in (*sources, *results)]
    proc = _run([exe, *files])
    output = proc.stdout + proc.stderr
    bad = _bad_lines(output, lambda line: line.startswith("Error"))
    if bad:
        _fail("dcentvfy", ", ".join(str(p) for p in results), bad, output)
    return output
