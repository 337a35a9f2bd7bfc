"""Mask heads on the shared backbone pass vs. a pass of their own, on the same series.

The sample CT (prepared ahead, so only the model's work is timed) is analysed with the
demo classifier and the demo mask head: (a) classifier pass then a separate mask pass, as
the pipeline once did; (b) one pass feeding both. Prints seconds per run and the ratio b/a.

    .venv/bin/python -m benchmarks.masks [--copies 5] [--runs 3] [--size tiny|base]
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.prepare import parse_args, sample_series
from pipelines.model.backbone import demo_backbone
from pipelines.model.heads import demo_head
from pipelines.model.inference import analyse_series, analyse_series_and_masks
from pipelines.model.masks import demo_mask_head, segment_series
from pipelines.model.prepared import prepare_series


def main() -> None:
    args = parse_args(__doc__)

    backbone = demo_backbone(args.size)
    heads = [demo_head(backbone.spec.hidden_size)]
    mask_head = demo_mask_head(backbone.spec.hidden_size)
    root = Path(tempfile.mkdtemp(prefix="curia-bench-masks-"))
    try:
        paths, uid = sample_series(root / "ct", args.copies)
        series = prepare_series(paths, root / "prepared")
        print(f"{len(paths)} slices (prepared), backbone {args.size}, {backbone.device}")
        analyse_series(series, backbone, heads, series_instance_uid=uid)  # warm up
        separate, shared = [], []
        for _ in range(args.runs):
            started = time.perf_counter()
            analyse_series(series, backbone, heads, series_instance_uid=uid)
            segment_series(series, backbone, mask_head)
            separate.append(time.perf_counter() - started)
            started = time.perf_counter()
            analyse_series_and_masks(
                series, backbone, heads, series_instance_uid=uid, mask_heads=[mask_head]
            )
            shared.append(time.perf_counter() - started)
        print("(a) separate mask pass  " + "  ".join(f"{v:6.2f} s" for v in separate))
        print("(b) shared pass         " + "  ".join(f"{v:6.2f} s" for v in shared))
        ratio = statistics.median(shared) / statistics.median(separate)
        print(f"ratio b/a (median): {ratio:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
