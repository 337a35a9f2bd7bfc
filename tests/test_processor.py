"""Curia's image processor: golden values from an independent reference, and its config file.

The reference below is written from the published description of the processor, in numpy
float64, with its own antialiased bicubic resize (separable cubic convolution, a = -0.5,
half-pixel centres, the kernel widened by the scale when shrinking): none of the node's code
path is used, so an order or statistics slip in the node shows up as a difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from pipelines.model.backbone import (
    Backbone,
    WeightsError,
    demo_backbone,
    load_backbone,
    save_hf_folder,
)
from pipelines.model.head_groups import head_preprocessing
from pipelines.model.heads import demo_head
from pipelines.model.inference import analyse_series
from pipelines.model.preprocess import PreparedSeries, load_series, plan_series, read_slice
from pipelines.model.processor import (
    PROCESSOR_FILE,
    ProcessorSettings,
    normalise_slices,
    volume_statistics,
)
from tests.support.testdata import repaired_ct_series

SIZE = 512

# --- the reference -------------------------------------------------------------------------


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    scale = n_in / n_out
    support = 2.0 * max(scale, 1.0)
    stretch = 1.0 / max(scale, 1.0)
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        taps = _cubic((np.arange(lo, hi) - centre + 0.5) * stretch)
        weights[i, lo:hi] = taps / taps.sum()
    return weights


def ref_resize(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    if image.shape == (size, size):
        return image.astype(np.float64)
    rows, cols = _resize_matrix(image.shape[0], size), _resize_matrix(image.shape[1], size)
    return rows @ image.astype(np.float64) @ cols.T


def ref_zscore(x: np.ndarray) -> np.ndarray:
    m, s = x.mean(), x.std(ddof=1)
    return x - m if s < 1e-6 else (x - m) / s


def ref_newer(slices: np.ndarray, clip: bool, size: int = SIZE) -> np.ndarray:
    """HU -> resize -> clamp below air -> z-score per slice (ddof 1)."""
    out = []
    for image in slices:
        x = ref_resize(image, size)
        if clip:
            x = np.maximum(x, -1000.0)
        out.append(ref_zscore(x))
    return np.stack(out)


def ref_older(slices: np.ndarray) -> np.ndarray:
    """int16 cast, /32767, resize per slice, one z-score over the whole volume."""
    scaled = [ref_resize(image.astype(np.int16).astype(np.float64) / 32767.0) for image in slices]
    return ref_zscore(np.stack(scaled))


# --- real slices ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return repaired_ct_series(tmp_path_factory.mktemp("ct"), "processor")


@pytest.fixture(scope="module")
def ct_pixels(ct: list[Path]) -> np.ndarray:
    return load_series(ct).pixels


def padded_field_of_view(image: np.ndarray) -> np.ndarray:
    """The scanner's padding (-3024) outside a circular field of view, as many CTs store it."""
    rows, cols = np.indices(image.shape)
    centre_r, centre_c = (image.shape[0] - 1) / 2, (image.shape[1] - 1) / 2
    outside = (rows - centre_r) ** 2 + (cols - centre_c) ** 2 > (0.45 * min(image.shape)) ** 2
    return np.where(outside, -3024.0, image).astype(np.float32)


def fractional_mr() -> np.ndarray:
    """The real MR_small slice with a fractional rescale, as many MR series store."""
    _, pixels = read_slice(Path(get_testdata_file("MR_small.dcm")))
    return (pixels * 0.0173 + 0.25).astype(np.float32)[None]


def _node(slices: np.ndarray, **options: object) -> np.ndarray:
    return normalise_slices(slices, size=SIZE, **options)[:, 0].double().numpy()  # type: ignore[arg-type]


@pytest.mark.parametrize("clip", [True, False], ids=["clamp", "no-clamp"])
def test_newer_processor_on_a_padded_non_square_ct(ct_pixels: np.ndarray, clip: bool) -> None:
    crop = np.stack([padded_field_of_view(s[60:460, 100:400]) for s in ct_pixels[8:11]])
    assert crop.shape[1:] == (400, 300) and crop.min() == -3024.0
    expected = ref_newer(crop, clip)
    np.testing.assert_allclose(_node(crop, clip_below_air=clip), expected, atol=2e-4)
    if clip:  # clamping before the resize instead would miss by far at the field's edge
        early = ref_newer(np.maximum(crop, -1000.0), clip=False)
        assert np.abs(early - expected).max() > 0.1


def test_newer_processor_on_full_size_ct(ct_pixels: np.ndarray) -> None:
    slices = ct_pixels[:2]
    assert slices.shape[1:] == (SIZE, SIZE)
    np.testing.assert_allclose(
        _node(slices, clip_below_air=True), ref_newer(slices, clip=True), atol=2e-4
    )


def test_newer_processor_keeps_fractional_mr_values() -> None:
    mr = fractional_mr()
    assert mr.shape[1:] == (64, 64) and np.any(mr != np.round(mr))
    np.testing.assert_allclose(_node(mr), ref_newer(mr, clip=False), atol=2e-4)


def test_older_processor_normalises_the_volume(ct_pixels: np.ndarray) -> None:
    crop = np.stack([padded_field_of_view(s[60:460, 100:400]) for s in ct_pixels[8:12]])
    stats = volume_statistics([crop[:3], crop[3:]], size=SIZE)  # streamed in two chunks
    got = _node(crop, variant="volume", volume=stats)
    np.testing.assert_allclose(got, ref_older(crop), atol=2e-4)
    # one mean over the volume: the slices' own means are not each zero
    assert np.abs(got.mean(axis=(1, 2))).max() > 1e-3


def test_older_processor_truncates_fractional_mr() -> None:
    mr = fractional_mr()
    stats = volume_statistics([mr], size=SIZE)
    got = _node(mr, variant="volume", volume=stats)
    np.testing.assert_allclose(got, ref_older(mr), atol=2e-4)
    assert np.abs(got - ref_newer(mr, clip=False)).max() > 0.05  # the int16 cast shows


def test_zscore_uses_the_unbiased_std() -> None:
    """On a small output the unbiased and the population std differ by several percent."""
    mr = fractional_mr()
    got = normalise_slices(mr, size=8)[:, 0].double().numpy()
    np.testing.assert_allclose(got, ref_newer(mr, clip=False, size=8), atol=2e-5)
    assert abs(float(got.std(ddof=1)) - 1.0) < 1e-5


def test_uniform_slice_is_only_centred() -> None:
    out = _node(np.full((1, SIZE, SIZE), 37.5, dtype=np.float32))
    assert np.abs(out).max() < 1e-4


def test_volume_variant_needs_the_statistics() -> None:
    with pytest.raises(ValueError, match="volume statistics"):
        normalise_slices(np.zeros((1, 8, 8), dtype=np.float32), variant="volume")


# --- preprocessor_config.json ---------------------------------------------------------------


def _folder(tmp_path: Path, backbone: Backbone, config: dict | None = None) -> Path:
    folder = tmp_path / "curia"
    save_hf_folder(backbone, folder)
    if config is not None:
        (folder / PROCESSOR_FILE).write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return demo_backbone("tiny", seed=0)


def test_written_settings_read_back(tmp_path: Path, tiny: Backbone) -> None:
    tiny_clip = Backbone(
        model=tiny.model,
        spec=tiny.spec,
        identity=tiny.identity,
        processor=ProcessorSettings(clip_below_air=True, variant="volume", size=SIZE),
    )
    loaded = load_backbone(_folder(tmp_path, tiny_clip))
    assert loaded.processor == ProcessorSettings(clip_below_air=True, variant="volume", size=SIZE)


def test_clip_below_air_from_the_folder_reaches_the_heads(
    tmp_path: Path, tiny: Backbone, ct: list[Path], ct_pixels: np.ndarray
) -> None:
    """Curia-2's config turns the clamp on: a head that does not say otherwise gets it."""
    config = {
        "image_processor_type": "CuriaImageProcessor",
        "clip_below_air": True,
        "do_resize": True,
        "size": {"height": SIZE, "width": SIZE},
        "do_normalize": True,
    }
    loaded = load_backbone(_folder(tmp_path, tiny, config))
    head = demo_head(tiny.spec.hidden_size)
    assert head.card.clip_below_air is None
    assert head_preprocessing(head, loaded) == (True, "slice")
    # padding that the clamp changes, so the setting is visible in the result
    plan = plan_series(ct)
    padded = PreparedSeries(
        plan=plan,
        pixels=np.stack([padded_field_of_view(s[60:460, 100:400]) for s in ct_pixels]),
    )
    found = analyse_series(padded, loaded, [head], series_instance_uid="1").findings[0]
    told = head.card.model_copy(update={"clip_below_air": True})
    explicit = analyse_series(
        padded, tiny, [type(head)(card=told, linear=head.linear)], series_instance_uid="1"
    ).findings[0]
    plain = analyse_series(padded, tiny, [head], series_instance_uid="1").findings[0]
    assert found.probabilities == pytest.approx(explicit.probabilities, abs=1e-6)
    assert (
        max(abs(a - b) for a, b in zip(found.probabilities, plain.probabilities, strict=True))
        > 1e-5
    )
    # a head's own card wins over the folder
    unclipped = head.card.model_copy(update={"clip_below_air": False, "processor": "volume"})
    own = type(head)(card=unclipped, linear=head.linear)
    assert head_preprocessing(own, loaded) == (False, "volume")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"clip_below_air": True, "image_mean": [0.5]}, "unknown key 'image_mean'"),
        ({"size": 224}, "size 224 but the backbone's config.json says image_size 512"),
        ({"do_resize": False}, "do_resize is false"),
        ({"clip_below_air": "yes"}, "clip_below_air is 'yes'"),
        ({"size": {"height": 512, "width": 384}}, "not square"),
        ({"normalization": "dataset mean/std"}, "normalization 'dataset mean/std'"),
    ],
)
def test_unknown_or_unsupported_settings_are_refused(
    tmp_path: Path, tiny: Backbone, config: dict, message: str
) -> None:
    folder = _folder(tmp_path, tiny, config)
    with pytest.raises(WeightsError) as err:
        load_backbone(folder)
    assert message in str(err.value) and PROCESSOR_FILE in str(err.value)


def test_folder_without_processor_config_uses_the_defaults(tmp_path: Path, tiny: Backbone) -> None:
    folder = _folder(tmp_path, tiny)
    (folder / PROCESSOR_FILE).unlink()
    loaded = load_backbone(folder)
    assert loaded.processor is None
    assert loaded.preprocessing == ProcessorSettings(size=SIZE)


def test_torch_input_works_too() -> None:
    x = torch.randn(2, 30, 20) * 50
    np.testing.assert_allclose(
        normalise_slices(x, size=SIZE)[:, 0].double().numpy(),
        ref_newer(x.numpy(), clip=False),
        atol=2e-4,
    )
