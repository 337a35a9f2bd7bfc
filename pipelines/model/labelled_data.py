"""A site's labelled training data: series found in a folder, labels and codes from CSV files.

One series per subfolder of DICOM files, or per ``NAME.nii[.gz]`` volume; ``labels.csv``
maps series names to labels and ``codes.csv`` labels to the codes a report states. Every
problem is refused with the file (and line) named.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipelines.model.head_card import CodeCard

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class TrainingError(ValueError):
    """Training data or settings the node cannot use; the message says which and why."""


# --- the data ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesSource:
    """One labelled unit: a folder of DICOM files, or one NIfTI volume."""

    name: str
    kind: Literal["dicom", "nifti"]
    paths: tuple[Path, ...]

    def fingerprint(self) -> str:
        """Changes when a file is added, removed, replaced or rewritten."""
        digest = hashlib.sha256()
        for path in self.paths:
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def nibabel_available() -> bool:
    try:
        import nibabel  # noqa: F401
    except ImportError:
        return False
    return True


def _nifti_name(path: Path) -> str | None:
    lower = path.name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def discover_series(data_dir: Path) -> tuple[list[SeriesSource], list[str]]:
    """Every series under ``data_dir``: one subfolder of DICOM files each, or ``NAME.nii[.gz]``.

    Hidden files and folders (the feature cache among them) are skipped. NIfTI volumes need
    nibabel; without it they are left out and the returned notes say so.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TrainingError(f"{data_dir}: data folder does not exist")
    sources: list[SeriesSource] = []
    notes: list[str] = []
    skipped_nifti: list[str] = []
    can_read_nifti = nibabel_available()
    for entry in sorted(data_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = sorted(
                p
                for p in entry.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(entry).parts)
            )
            if files:
                sources.append(SeriesSource(entry.name, "dicom", tuple(files)))
            continue
        name = _nifti_name(entry)
        if name is None:
            continue
        if can_read_nifti:
            sources.append(SeriesSource(name, "nifti", (entry,)))
        else:
            skipped_nifti.append(entry.name)
    if skipped_nifti:
        notes.append(
            f"{len(skipped_nifti)} NIfTI file(s) skipped: reading NIfTI needs nibabel "
            f"(pip install nibabel): {', '.join(skipped_nifti[:5])}"
        )
    names = [s.name for s in sources]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise TrainingError(f"{data_dir}: series names used twice (folder and NIfTI): {clashes}")
    return sources, notes


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in columns if c not in header]
            if missing:
                raise TrainingError(
                    f"{path}: needs a header row with columns {list(columns)}; missing {missing}"
                )
            rows = []
            for line, row in enumerate(reader, start=2):
                clean = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                empty = [c for c in columns if not clean.get(c)]
                if empty:
                    raise TrainingError(f"{path}: line {line}: empty {', '.join(empty)}")
                rows.append(clean | {"_line": str(line)})
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TrainingError(f"{path}: cannot read: {exc}") from exc


def read_labels(path: Path) -> dict[str, str]:
    """``series,label`` rows (series = the subfolder or NIfTI name), one per series."""
    labels: dict[str, str] = {}
    for row in _read_csv(path, ("series", "label")):
        if row["series"] in labels:
            raise TrainingError(f"{path}: line {row['_line']}: series {row['series']!r} repeated")
        labels[row["series"]] = row["label"]
    if not labels:
        raise TrainingError(f"{path}: no labelled series")
    return labels


def read_codes(path: Path) -> dict[str, CodeCard]:
    """``label,value,scheme,meaning`` rows: the code a report states for each label."""
    out: dict[str, CodeCard] = {}
    for row in _read_csv(path, ("label", "value", "scheme", "meaning")):
        if row["label"] in out:
            raise TrainingError(f"{path}: line {row['_line']}: label {row['label']!r} repeated")
        out[row["label"]] = CodeCard(
            value=row["value"], scheme=row["scheme"], meaning=row["meaning"]
        )
    return out


def class_order(labels: Sequence[str]) -> list[str]:
    """Distinct labels in a stable order: numerically when they are all integers."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)
