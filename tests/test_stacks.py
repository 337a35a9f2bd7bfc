"""Stacks: a series split as scanners send them, multi-frame objects, coronal and sagittal.

Built from the real sample CT (tests.support.testdata) and pydicom's Enhanced MR test files:
what the model is handed is compared with expectations built by hand from the axial volume.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from pipelines.model.head_card import HeadCard
from pipelines.model.heads import demo_head
from pipelines.model.preprocess import iter_series_chunks, load_series
from pipelines.model.series_plan import SeriesPlan
from pipelines.model.stack_match import heads_for_stack, why_not
from pipelines.model.stacks import plan_stacks
from tests.support.stacks import legacy_enhanced_ct, resliced, sample, z_of
from tests.support.testdata import repaired_ct_series

ENHANCED_MR = [
    "emri_small.dcm",
    "emri_small_big_endian.dcm",
    "emri_small_RLE.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
]

AXIAL_IOP = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
CORONAL_IOP = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
SAGITTAL_IOP = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]


def decoded(plan: SeriesPlan) -> np.ndarray:
    return np.concatenate([pixels for _, pixels in iter_series_chunks(plan, 7)])


def copies(
    sources: list[Path], dest: Path, series_uid: str, label: str, **changes: object
) -> list[Path]:
    """The files again as other instances of ``series_uid``, with ``changes`` applied."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for n, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[label, str(n)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        for keyword, value in changes.items():
            setattr(ds, keyword, value(ds, n) if callable(value) else value)
        path = dest / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path)
        out.append(path)
    return out


@pytest.fixture(scope="module")
def real_ct(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return repaired_ct_series(tmp_path_factory.mktemp("ct"), "stacks")


# --- a series split into stacks -----------------------------------------------------------


def test_two_interleaved_reconstructions_are_two_stacks(
    real_ct: list[Path], tmp_path: Path
) -> None:
    """Two reconstructions under one Series UID, their InstanceNumbers interleaved."""
    series_uid = str(pydicom.dcmread(real_ct[0]).SeriesInstanceUID)
    order = {p: k for k, p in enumerate(sorted(real_ct, key=lambda p: z_of(p)))}
    first = copies(real_ct, tmp_path / "a", series_uid, "a", InstanceNumber=lambda ds, n: 2 * n + 1)
    second = copies(
        real_ct, tmp_path / "b", series_uid, "b", InstanceNumber=lambda ds, n: 2 * n + 2
    )
    assert order  # both share every position
    planned = plan_stacks([*second, *first])
    assert planned.skipped == []
    assert [len(s) for s in planned.stacks] == [20, 20]
    uids = [set(s.sop_instance_uids) for s in planned.stacks]
    assert uids == [_uids(first), _uids(second)], "each stack is one reconstruction, whole"
    labels = [s.label for s in planned.stacks]
    assert [label.split(",")[0] for label in labels] == [
        "axial stack 1 (20 slices",
        "axial stack 2 (20 slices",
    ]
    assert labels[0][len("axial stack 1") :] == labels[1][len("axial stack 2") :]
    for stack in planned.stacks:
        z = [z_of(p) for p in stack.paths]
        assert z == sorted(z), "each stack runs feet to head"


def test_multi_echo_series_is_one_stack_per_echo(real_ct: list[Path], tmp_path: Path) -> None:
    series_uid = str(pydicom.dcmread(real_ct[0]).SeriesInstanceUID)
    echo1 = copies(real_ct, tmp_path / "e1", series_uid, "e1", EchoNumbers=1)
    echo2 = copies(real_ct, tmp_path / "e2", series_uid, "e2", EchoNumbers=2)
    planned = plan_stacks(echo1 + echo2)
    assert [set(s.sop_instance_uids) for s in planned.stacks] == [_uids(echo1), _uids(echo2)]
    assert ["echo 1" in s.label for s in planned.stacks] == [True, False]
    assert "echo 2" in planned.stacks[1].label


def test_three_plane_localizer_is_set_aside(real_ct: list[Path], tmp_path: Path) -> None:
    """A three-plane localizer in the axial series' Series UID: three localizers apart."""
    series_uid = str(pydicom.dcmread(real_ct[0]).SeriesInstanceUID)
    localizer = copies(
        real_ct[:3],
        tmp_path / "loc",
        series_uid,
        "loc",
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        ImageOrientationPatient=lambda ds, n: [AXIAL_IOP, CORONAL_IOP, SAGITTAL_IOP][n],
        InstanceNumber=lambda ds, n: 100 + n,
    )
    planned = plan_stacks([*localizer, *real_ct])
    assert [len(s) for s in planned.stacks] == [20]
    assert set(planned.stacks[0].sop_instance_uids) == _uids(real_ct)
    assert [s.reason for s in planned.skipped] == ["localizer"] * 3
    assert sorted(s.label.split(" (")[0] for s in planned.skipped) == ["localizer"] * 3
    alone = plan_stacks(localizer)
    assert alone.stacks == []
    reason = alone.not_analysed().reason
    assert reason.count("localizer (1 slice, 512x512") == 3, reason


def test_objects_that_are_not_images_are_set_aside(tmp_path: Path) -> None:
    rtstruct = Dataset()
    rtstruct.file_meta = FileMetaDataset()
    rtstruct.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    rtstruct.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.481.3")
    rtstruct.SOPInstanceUID = generate_uid()
    rtstruct.SeriesInstanceUID = generate_uid()
    rtstruct.Modality = "RTSTRUCT"
    path = tmp_path / "rt.dcm"
    rtstruct.save_as(path, enforce_file_format=True)
    planned = plan_stacks([path])
    assert planned.stacks == []
    assert planned.not_analysed().reason == "1 object: RT Structure Set Storage: not an image"


# --- which heads read a stack ------------------------------------------------------------


class _Card:
    def __init__(self, planes: list[str], min_slices: int = 1, modalities: list[str] = []):  # noqa: B006
        self.planes, self.min_slices, self.modalities = planes, min_slices, modalities


class _Head:
    def __init__(self, card: _Card) -> None:
        self.card = card


def test_heads_run_only_on_stacks_their_cards_accept(real_ct: list[Path]) -> None:
    plan = plan_stacks(real_ct).stacks[0]
    axial, sagittal = _Head(_Card(["axial"])), _Head(_Card(["sagittal"]))
    assert heads_for_stack([axial, sagittal], plan) == [axial]
    assert why_not([_Card(["sagittal"]), _Card(["coronal", "sagittal"])], plan) == (
        "axial stack, every head is coronal/sagittal"
    )
    assert why_not([_Card(["axial"], min_slices=40)], plan) == "20 slices, heads need 40"
    assert why_not([_Card(["axial"], modalities=["MR"])], plan) == "CT stack, every head reads MR"


# --- multi-frame objects -----------------------------------------------------------------


@pytest.mark.parametrize("name", ENHANCED_MR)
def test_enhanced_mr_frames_decode_alike_in_every_transfer_syntax(name: str) -> None:
    reference = plan_stacks([sample("emri_small.dcm")]).stacks[0]
    [plan] = plan_stacks([sample(name)]).stacks
    assert plan.frames == tuple(range(1, 11))
    assert len(set(plan.sop_instance_uids)) == 1
    expected = pydicom.dcmread(sample("emri_small.dcm")).pixel_array.astype(np.float32)
    np.testing.assert_array_equal(decoded(plan), expected)
    np.testing.assert_array_equal(decoded(plan), decoded(reference))


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
def test_legacy_converted_ct_frames_equal_the_single_frame_series(
    real_ct: list[Path], tmp_path: Path, syntax: str
) -> None:
    """Frames placed from the functional groups: the same HU volume, in the same order."""
    path = legacy_enhanced_ct(real_ct, tmp_path, syntax)
    [plan] = plan_stacks([path]).stacks
    assert plan.sorted_by == "position" and len(plan) == 20 and plan.plane == "axial"
    volume = load_series(real_ct)
    np.testing.assert_array_equal(decoded(plan), volume.pixels)
    # the frame that holds slice i is the one made from slice i of the series
    multi = pydicom.dcmread(path, stop_before_pixels=True)
    groups = multi.PerFrameFunctionalGroupsSequence
    for i, frame in enumerate(plan.frames):
        z = float(groups[frame - 1].PlanePositionSequence[0].ImagePositionPatient[2])
        assert z == pytest.approx(z_of(volume.paths[i]))


# --- coronal and sagittal ----------------------------------------------------------------


def test_coronal_stack_is_laid_out_il(real_ct: list[Path], tmp_path: Path) -> None:
    volume = load_series(real_ct).pixels
    [plan] = plan_stacks(resliced(real_ct, tmp_path, "coronal")).stacks
    assert plan.plane == "coronal"
    # hand-built IL: down the rows towards the feet, along a row towards the patient's left;
    # slices anterior to posterior
    expected = np.stack([volume[::-1, j, :] for j in range(0, volume.shape[1], 64)])
    np.testing.assert_array_equal(decoded(plan), expected)


def test_sagittal_stack_is_laid_out_ip(real_ct: list[Path], tmp_path: Path) -> None:
    volume = load_series(real_ct).pixels
    [plan] = plan_stacks(resliced(real_ct, tmp_path, "sagittal")).stacks
    assert plan.plane == "sagittal"
    # hand-built IP: down the rows towards the feet, along a row towards posterior;
    # slices right to left
    expected = np.stack([volume[::-1, :, i] for i in range(0, volume.shape[2], 64)])
    np.testing.assert_array_equal(decoded(plan), expected)


def _uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_cards_read_axial_stacks_unless_they_say_otherwise() -> None:
    """Existing cards keep their meaning; a card names only planes Curia lays out."""
    card = demo_head(16).card
    assert card.planes == ["axial"] and card.min_slices == 1 and card.modalities == []
    sagittal = HeadCard.model_validate(
        {**card.model_dump(), "planes": ["sagittal"], "min_slices": 20}
    )
    assert sagittal.planes == ["sagittal"] and sagittal.min_slices == 20
    with pytest.raises(ValidationError, match="planes"):
        HeadCard.model_validate({**card.model_dump(), "planes": ["oblique"]})
    with pytest.raises(ValidationError, match="min_slices"):
        HeadCard.model_validate({**card.model_dump(), "min_slices": 0})
