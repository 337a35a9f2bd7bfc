"""What a lower backbone precision changes: CLS features, head probabilities, speed.

Raidium runs Curia in fp32; ``model.precision`` may autocast the backbone to bf16 or fp16
for speed. This runs the real sample CT (TotalSegmentator's 20-slice abdominal CT) and the
real sample MR (pydicom's MR_small, fractional rescale kept) through the node's
preprocessing, then the backbone in each precision, and prints per precision against fp32:

- the cosine similarity of each slice's CLS feature (min and mean),
- the largest change of any head probability, over random per-slice heads of 2, 5 and 54
  classes (Raidium's 2D heads are linear on the CLS; their logits are a few units in size so
  that the softmax is not flat, where any change would look small),
- the fraction of slice predictions whose class changes,
- the speed ratio (fp32 time / this precision's time) of the backbone forward.

The released weights are gated, so the backbone is the Curia-B architecture with seeded
random weights unless ``--weights`` names a local folder. On a machine without CUDA the
lower precisions are CPU autocast, which says little about GPU speed: the table says which
device ran it.

    .venv/bin/python -m benchmarks.precision [--weights FOLDER] [--device auto|cpu|cuda]
        [--size base|tiny] [--ct-slices N] [--batch N]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pydicom.data import get_testdata_file

from pipelines.model.backbone import PRECISIONS, Backbone, demo_backbone, load_backbone
from pipelines.model.inference import select_device
from pipelines.model.preprocess import load_series, preprocess_slices, read_slice
from tests.support.testdata import repaired_ct_series

HEAD_WIDTHS = (2, 5, 54)
LOGIT_SCALE = 3.0


def _inputs(ct_slices: int) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as folder:  # its UIDs are empty: repaired copies
        ct = load_series(repaired_ct_series(Path(folder), "precision")).pixels[:ct_slices]
    _, mr = read_slice(Path(get_testdata_file("MR_small.dcm")))
    return {"CT": ct, "MR": (mr * 0.0173 + 0.25).astype(np.float32)[None]}


def _forward(backbone: Backbone, batch: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """CLS features (float32, CPU) and the seconds the forward passes took."""
    out = []
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for chunk in batch.split(size):
        out.append(backbone.features(chunk).float().cpu())
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(out), time.perf_counter() - start


def _heads(reference: torch.Tensor, seed: int = 0) -> list[torch.nn.Linear]:
    """Random linear heads whose fp32 logits are about LOGIT_SCALE in size.

    Scaled to the features' norm (not to their differences between slices, which random
    backbone weights make tiny), so a probability change measures the feature error, not an
    amplification of it that no trained head would have.
    """
    g = torch.Generator().manual_seed(seed)
    norm = float(reference.norm(dim=1).mean()) or 1.0
    heads = []
    for width in HEAD_WIDTHS:
        linear = torch.nn.Linear(reference.shape[1], width)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * LOGIT_SCALE / norm)
            linear.bias.zero_()
        heads.append(linear)
    return heads


@dataclasses.dataclass
class Row:
    modality: str
    precision: str
    slices: int
    cosine_min: float
    cosine_mean: float
    max_probability_change: float
    changed_classes: float
    speed_ratio: float


def compare(backbone: Backbone, pixels: np.ndarray, modality: str, batch_size: int) -> list[Row]:
    batch = preprocess_slices(pixels, size=backbone.spec.image_size, device=backbone.device)
    timings: dict[str, float] = {}
    features: dict[str, torch.Tensor] = {}
    for precision in PRECISIONS:
        run = dataclasses.replace(backbone, precision=precision)  # type: ignore[arg-type]
        _forward(run, batch[:1], batch_size)  # warm-up
        features[precision], timings[precision] = _forward(run, batch, batch_size)
    reference = features["fp32"]
    heads = _heads(reference)
    rows = []
    for precision in PRECISIONS[1:]:
        lower = features[precision]
        cosine = torch.nn.functional.cosine_similarity(reference, lower, dim=1)
        change, changed, total = 0.0, 0, 0
        with torch.no_grad():
            for head in heads:
                p32, plow = head(reference).softmax(-1), head(lower).softmax(-1)
                change = max(change, float((p32 - plow).abs().max()))
                changed += int((p32.argmax(-1) != plow.argmax(-1)).sum())
                total += p32.shape[0]
        rows.append(
            Row(
                modality=modality,
                precision=precision,
                slices=len(reference),
                cosine_min=float(cosine.min()),
                cosine_mean=float(cosine.mean()),
                max_probability_change=change,
                changed_classes=changed / total,
                speed_ratio=timings["fp32"] / timings[precision],
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=None, help="Curia weights folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", choices=("base", "tiny"), default="base")
    parser.add_argument("--ct-slices", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    device = select_device(args.device)
    backbone = (
        load_backbone(args.weights, device=device)
        if args.weights
        else demo_backbone(args.size, seed=0, device=device)
    )
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU autocast"
    print(
        f"backbone {backbone.identity.name}, device {device} ({where}), torch {torch.__version__}"
    )
    print(
        "| series | precision | slices | CLS cosine min | CLS cosine mean | "
        "max prob change | changed classes | speed vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for modality, pixels in _inputs(args.ct_slices).items():
        for row in compare(backbone, pixels, modality, args.batch):
            print(
                f"| {row.modality} | {row.precision} | {row.slices} | {row.cosine_min:.6f} | "
                f"{row.cosine_mean:.6f} | {row.max_probability_change:.4f} | "
                f"{row.changed_classes:.3f} | {row.speed_ratio:.2f}x |"
            )


if __name__ == "__main__":
    main()
