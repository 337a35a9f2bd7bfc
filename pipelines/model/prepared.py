"""Prepared stacks: a whole stack decoded once into a folder, read back memory-mapped.

The prepare stage runs this on a CPU worker so the worker holding the GPU only resizes and
embeds. A folder is written under a temporary name and renamed, so a reader sees a complete
series or none.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipelines.model.orientation import Reorientation
from pipelines.model.preprocess import iter_series_chunks
from pipelines.model.series_plan import PreparedSeries, SeriesPlan, plan_series

PREPARED_PIXELS = "pixels.npy"
PREPARED_PLAN = "plan.json"


def prepare_series(paths: Sequence[Path], folder: Path, *, chunk: int = 16) -> PreparedSeries:
    """Decode a series that is one stack into ``folder``; see :func:`prepare_plan`."""
    return prepare_plan(plan_series(paths), folder, chunk=chunk)


def prepare_plan(plan: SeriesPlan, folder: Path, *, chunk: int = 16) -> PreparedSeries:
    """Decode a whole stack into ``folder`` (pixels + plan); return it, memory-mapped.

    Written under a temporary name and renamed, so a reader sees a complete folder or
    none. Only a chunk of slices is in memory at a time.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        out = np.lib.format.open_memmap(
            tmp / PREPARED_PIXELS, mode="w+", dtype=np.float32, shape=(len(plan), *plan.shape)
        )
        for indices, pixels in iter_series_chunks(plan, chunk):
            out[indices[0] : indices[-1] + 1] = pixels
        out.flush()
        del out
        record = dataclasses.asdict(plan)
        record["paths"] = [str(p) for p in plan.paths]
        (tmp / PREPARED_PLAN).write_text(json.dumps(record))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prepared = load_prepared(folder)
    assert prepared is not None
    return prepared


def load_prepared(folder: Path, expected: SeriesPlan | None = None) -> PreparedSeries | None:
    """The stack :func:`prepare_plan` wrote to ``folder``; None if it is not (all) there,
    or when it is not the ``expected`` stack (the same slices and frames, in order)."""
    try:
        record = json.loads((folder / PREPARED_PLAN).read_text())
        pixels = np.load(folder / PREPARED_PIXELS, mmap_mode="r")
    except (OSError, ValueError):
        return None
    plan = SeriesPlan(
        **{
            **record,
            "paths": tuple(Path(p) for p in record["paths"]),
            "sop_instance_uids": tuple(record["sop_instance_uids"]),
            "reorientation": Reorientation(**record["reorientation"]),
            "frames": tuple(record.get("frames", ())),
            "rescales": tuple(tuple(r) for r in record.get("rescales", ())),
        }
    )
    if pixels.shape != (len(plan), *plan.shape):
        return None
    if expected is not None and (
        plan.sop_instance_uids != expected.sop_instance_uids or plan.frames != expected.frames
    ):
        return None
    return PreparedSeries(plan=plan, pixels=pixels)
