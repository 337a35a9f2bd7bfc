"""SR templates and the SR builder, checked with pydicom and the standard validators.

The source series is built from pydicom's real CT_small slice (new UIDs, stacked
positions, some type 2 attributes removed) and read back without pixels, as the node
reads what it received.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian, generate_uid

from node.core.settings import packaged_templates_dir
from pipelines.findings import CodeRef, HeadClass, HeadFinding, ModelIdentity, SeriesFindings
from pipelines.reporting.content import DEMO_STATEMENT, ReportError
from pipelines.reporting.document import build_sr
from pipelines.reporting.files import write_dataset
from pipelines.reporting.measurement_groups import LABEL_SCHEME
from pipelines.reporting.provenance import DeviceIdentity
from pipelines.reporting.templates import (
    ReportTemplate,
    TemplateError,
    load_template,
    load_templates,
)
from pipelines.reporting.uids import derived_uid
from tests.support.validators import (
    assert_dcentvfy_clean,
    assert_dciodvfy_clean,
    assert_dsrdump_clean,
    assert_pixelmed_sr_clean,
)

TEMPLATES_DIR = packaged_templates_dir()
REGIONS = ("Head", "Neck", "Chest", "Abdomen", "Pelvis")
PROBABILITIES = (0.05, 0.05, 0.7, 0.15, 0.05)
PREDICTED = 2  # chest
KEY_REGION = (10, 20, 40, 60)  # rows 10..39, columns 20..59 of the key slice
STRIPPED = ("AccessionNumber", "PatientBirthDate", "StudyID")


# --- fixtures ----------------------------------------------------------------------------


def _ref(code: pydicom.sr.coding.Code) -> CodeRef:
    return CodeRef(value=code.value, scheme=code.scheme_designator, meaning=code.meaning)


def _write_ct_series(folder: Path, n: int = 4) -> list[Path]:
    """A small real-looking CT series: one study/series, new instance UIDs, stacked z."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * i]
        ds.SliceLocation = z + 5.0 * i
        for keyword in STRIPPED:  # as some modalities send them: absent, not empty
            if keyword in ds:
                delattr(ds, keyword)
        path = folder / f"ct{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _findings(sources: list[Dataset], *, demo: bool = True, coded: bool = True) -> SeriesFindings:
    classes = tuple(
        HeadClass(name=r.lower(), code=_ref(getattr(codes.SCT, r)) if coded else None)
        for r in REGIONS
    )
    return SeriesFindings(
        series_instance_uid=str(sources[0].SeriesInstanceUID),
        model=ModelIdentity(name="Curia-B", version="1.0", demo=demo, weights_digest="sha256:0f"),
        findings=[
            HeadFinding(
                head_name="body-region",
                head_version="0.1.0-demo",
                task="classification",
                classes=classes,
                probabilities=PROBABILITIES,
                predicted_index=PREDICTED,
                key_slice=1,
                demo=demo,
                key_region=KEY_REGION,
            )
        ],
        slice_count=len(sources),
        sop_instance_uids_sorted=[str(ds.SOPInstanceUID) for ds in sources],
    )


@pytest.fixture(scope="module")
def ct_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _write_ct_series(tmp_path_factory.mktemp("ct"))


@pytest.fixture
def sources(ct_paths: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in ct_paths]


@pytest.fixture(scope="module")
def templates() -> dict[str, ReportTemplate]:
    return load_templates(TEMPLATES_DIR)


@pytest.fixture(scope="module")
def device() -> DeviceIdentity:
    return DeviceIdentity(
        model_name="Curia Node",
        software_version="0.1.0",
        device_uid=generate_uid(),
        device_name="CURIA",
        institution_name="Test Hospital",
    )


@pytest.fixture(scope="module")
def written_sr(
    ct_paths: list[Path],
    templates: dict[str, ReportTemplate],
    device: DeviceIdentity,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The demo SR written once for the whole module (validators are slow)."""
    srcs = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct_paths]
    sr = build_sr(srcs, _findings(srcs), templates, device)
    return write_dataset(sr, tmp_path_factory.mktemp("sr") / "sr.dcm")


@pytest.fixture(scope="module")
def sr(written_sr: Path) -> Dataset:
    return pydicom.dcmread(written_sr)


def _walk(items: list[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _walk(list(item.get("ContentSequence", [])))


def _name(item: Dataset) -> tuple[str, str]:
    concept = item.ConceptNameCodeSequence[0]
    return str(concept.CodeValue), str(concept.CodingSchemeDesignator)


def _key(code: pydicom.sr.coding.Code) -> tuple[str, str]:
    return code.value, code.scheme_designator


def _items(sr: Dataset, code: pydicom.sr.coding.Code) -> list[Dataset]:
    return [i for i in _walk(list(sr.ContentSequence)) if _name(i) == _key(code)]


def _groups(sr: Dataset) -> list[Dataset]:
    return _items(sr, codes.DCM.MeasurementGroup)


# --- document level ------------------------------------------------------------------------


def test_sr_is_comprehensive_3d_in_the_source_study_and_a_new_series(
    sr: Dataset, ct_paths: list[Path]
) -> None:
    source = pydicom.dcmread(ct_paths[0], stop_before_pixels=True)
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID
    assert sr.PatientName == source.PatientName
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SeriesNumber == 9901
    assert sr.Manufacturer == "Curia Node"
    assert sr.ManufacturerModelName == "Curia Node"
    assert sr.SoftwareVersions == "0.1.0"


def test_absent_type2_attributes_are_present_but_empty(sr: Dataset) -> None:
    for keyword in STRIPPED:
        assert keyword in sr, keyword
        assert not sr[keyword].value, keyword


def test_sources_are_not_mutated(
    sources: list[Dataset], templates: dict[str, ReportTemplate], device: DeviceIdentity
) -> None:
    before = [copy.deepcopy(ds) for ds in sources]
    build_sr(sources, _findings(sources), templates, device)
    assert sources == before
    assert all(keyword not in ds for ds in sources for keyword in STRIPPED)


def test_root_is_a_tid1500_imaging_measurement_report(sr: Dataset) -> None:
    assert _name(sr) == _key(codes.DCM.ImagingMeasurementReport)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    observer = _items(sr, codes.DCM.ObserverType)
    assert observer[0].ConceptCodeSequence[0].CodeValue == codes.DCM.Device.value
    procedure = _items(sr, codes.DCM.ProcedureReported)[0].ConceptCodeSequence[0]
    assert procedure.CodeValue == codes.cid100.CTUnspecifiedBodyRegion.value


def test_every_source_is_evidence_and_in_the_image_library(
    sr: Dataset, ct_paths: list[Path]
) -> None:
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct_paths}
    evidence = {
        str(sop.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert evidence == uids
    library = _items(sr, codes.DCM.ImageLibrary)[0]
    referenced = {
        str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for i in _walk(list(library.ContentSequence))
        if i.ValueType == "IMAGE"
    }
    assert referenced == uids


def test_library_states_shared_descriptors_once_and_each_position_per_entry(
    sr: Dataset, ct_paths: list[Path]
) -> None:
    """What every slice shares is said once for the group; each entry keeps its own z."""
    library = _items(sr, codes.DCM.ImageLibrary)[0]
    (group,) = library.ContentSequence
    shared = {_name(i) for i in group.ContentSequence if i.ValueType != "IMAGE"}
    assert {
        _key(codes.DCM.Modality),
        _key(codes.DCM.FrameOfReferenceUID),
        _key(codes.DCM.PixelDataRows),
        _key(codes.DCM.HorizontalPixelSpacing),
        _key(codes.DCM.ImageOrientationPatientRowX),
    } <= shared
    z_by_uid = {}
    for entry in (i for i in group.ContentSequence if i.ValueType == "IMAGE"):
        own = {_name(i): i for i in entry.ContentSequence}
        assert set(own) == {_key(codes.DCM.ImagePositionPatientZ)}
        value = own[_key(codes.DCM.ImagePositionPatientZ)].MeasuredValueSequence[0]
        z_by_uid[entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID] = float(
            value.NumericValue
        )
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct_paths]
    assert z_by_uid == {
        h.SOPInstanceUID: pytest.approx(float(h.ImagePositionPatient[2])) for h in headers
    }


def test_highdicom_view_of_the_document_has_the_library(
    sources: list[Dataset], templates: dict[str, ReportTemplate], device: DeviceIdentity
) -> None:
    built = build_sr(sources, _findings(sources), templates, device)
    names = [item.name for item in built.content[0].ContentSequence]
    assert names.index(codes.DCM.ImageLibrary) + 1 == names.index(codes.DCM.ImagingMeasurements)
    assert [i.ConceptNameCodeSequence[0].CodeValue for i in built.ContentSequence] == [
        n.value for n in names
    ]


def test_group_identifies_algorithm_finding_site_and_key_slice(
    sr: Dataset, ct_paths: list[Path], templates: dict[str, ReportTemplate]
) -> None:
    (group,) = _groups(sr)
    assert group.ContentTemplateSequence[0].TemplateIdentifier == "1501"
    children = list(group.ContentSequence)
    texts = {_name(i): i.TextValue for i in children if i.ValueType == "TEXT"}
    assert texts[_key(codes.DCM.TrackingIdentifier)] == "Body region classification"
    assert texts[_key(codes.DCM.AlgorithmName)] == "Curia-B + body-region"
    assert texts[_key(codes.DCM.AlgorithmVersion)] == "1.0 / 0.1.0-demo"
    coded = {
        _name(i): i.ConceptCodeSequence[0].CodeValue for i in children if i.ValueType == "CODE"
    }
    assert coded[_key(codes.DCM.AlgorithmFamily)] == codes.DCM.ArtificialIntelligence.value
    assert coded[_key(codes.SCT.FindingSite)] == codes.SCT.Chest.value
    assert coded[_key(codes.DCM.TargetRegion)] == codes.SCT.Chest.value
    assert coded[_key(codes.DCM.Finding)] == templates["body-region"].finding_type.value
    assert any(_name(i) == _key(codes.DCM.TrackingUniqueIdentifier) for i in children)
    (key_image,) = [i for i in children if i.ValueType == "IMAGE"]
    key_slice = pydicom.dcmread(ct_paths[1], stop_before_pixels=True)  # key_slice=1
    assert key_image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == key_slice.SOPInstanceUID


def test_probabilities_are_num_with_unit_1_and_their_class_as_site(sr: Dataset) -> None:
    (group,) = _groups(sr)
    nums = [i for i in group.ContentSequence if i.ValueType == "NUM"][1:]  # after the label
    assert [_name(n) for n in nums] == [_key(codes.DCM.Probability)] * len(REGIONS)
    by_site = {}
    for num in nums:
        value = num.MeasuredValueSequence[0]
        assert value.MeasurementUnitsCodeSequence[0].CodeValue == "1"
        assert value.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
        site = num.ContentSequence[0]
        assert _name(site) == _key(codes.SCT.FindingSite)
        by_site[site.ConceptCodeSequence[0].CodeValue] = float(value.NumericValue)
    expected = {getattr(codes.SCT, r).value: p for r, p in zip(REGIONS, PROBABILITIES, strict=True)}
    assert by_site == pytest.approx(expected)


def test_demo_statement_and_summary_are_in_the_document(sr: Dataset) -> None:
    assert "DEMO" in sr.SeriesDescription and "NOT FOR DIAGNOSIS" in sr.SeriesDescription
    comments = [i.TextValue for i in _items(sr, codes.DCM.Comment)]
    assert DEMO_STATEMENT in comments
    # directly in the root's Qualitative Evaluations container, where viewers show it
    container = next(
        i
        for i in sr.ContentSequence
        if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    )
    assert container.ContentSequence[0].TextValue == DEMO_STATEMENT
    summaries = [i.TextValue for i in _items(sr, codes.DCM.Summary)]
    assert summaries == ["Predicted body region: chest (70%)"]
    params = [i.TextValue for i in _items(sr, codes.DCM.AlgorithmParameters)]
    assert any("demo" in p for p in params)


def test_contributing_equipment_has_the_ihe_air_item(sr: Dataset, device: DeviceIdentity) -> None:
    items = [
        e
        for e in sr.ContributingEquipmentSequence
        if e.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
    ]
    assert len(items) == 1
    (item,) = items
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert purpose.CodingSchemeDesignator == "99IHE"
    assert purpose.CodeMeaning == "Processing Algorithm"
    assert item.Manufacturer == device.manufacturer
    assert item.ManufacturerModelName == device.model_name
    assert item.SoftwareVersions == device.software_version
    assert item.DeviceUID == device.device_uid


def test_written_file_has_explicit_le_meta_and_no_temp_left(written_sr: Path, sr: Dataset) -> None:
    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sr.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID
    assert sorted(p.name for p in written_sr.parent.iterdir()) == ["sr.dcm"]


# --- variants ------------------------------------------------------------------------------


def _drawn(group: Dataset) -> list[tuple[Dataset, Dataset]]:
    """(NUM, SCOORD) pairs of a group: the measurements a viewer draws on an image."""
    return [
        (num, scoord)
        for num in group.ContentSequence
        if num.ValueType == "NUM"
        for scoord in num.get("ContentSequence", [])
        if scoord.ValueType == "SCOORD"
    ]


def _points(scoord: Dataset) -> list[float]:
    return [float(v) for v in scoord.GraphicData]


def test_finding_is_drawn_on_its_key_slice_with_a_readable_label(
    sr: Dataset, ct_paths: list[Path]
) -> None:
    """What OHIF draws: a 2D outline on the key slice, labelled by its NUM's concept name."""
    (group,) = _groups(sr)
    ((num, scoord),) = _drawn(group)
    assert scoord.RelationshipType == "INFERRED FROM"
    assert scoord.GraphicType == "POLYLINE"
    # (column, row) pairs around rows 10..40 and columns 20..60, closed
    assert _points(scoord) == [20, 10, 60, 10, 60, 40, 20, 40, 20, 10]
    key_slice = pydicom.dcmread(ct_paths[1], stop_before_pixels=True)  # key_slice=1
    (image,) = [i for i in scoord.ContentSequence if i.ValueType == "IMAGE"]
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == key_slice.SOPInstanceUID
    # the label comes first: viewers show the first few measurements of a group only
    assert next(i for i in group.ContentSequence if i.ValueType == "NUM") is num
    concept = num.ConceptNameCodeSequence[0]
    assert concept.CodeMeaning == "DEMO Chest probability"
    assert concept.CodingSchemeDesignator == LABEL_SCHEME
    measured = num.MeasuredValueSequence[0]
    assert float(measured.NumericValue) == pytest.approx(70.0)
    assert measured.MeasurementUnitsCodeSequence[0].CodeValue == "%"
    schemes = {i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence}
    assert LABEL_SCHEME in schemes


def test_trained_weights_label_has_no_demo_mark_and_no_region_means_whole_slice(
    sources: list[Dataset], templates: dict[str, ReportTemplate], device: DeviceIdentity
) -> None:
    findings = _findings(sources, demo=False)
    findings.findings[0] = dataclasses.replace(findings.findings[0], key_region=None)
    sr = build_sr(sources, findings, templates, device)
    ((num, scoord),) = _drawn(_groups(sr)[0])
    assert num.ConceptNameCodeSequence[0].CodeMeaning == "Chest probability"
    rows, columns = int(sources[1].Rows), int(sources[1].Columns)
    assert _points(scoord) == [0, 0, columns, 0, columns, rows, 0, rows, 0, 0]


def test_key_region_outside_the_image_is_refused(
    sources: list[Dataset], templates: dict[str, ReportTemplate], device: DeviceIdentity
) -> None:
    findings = _findings(sources)
    rows = int(sources[1].Rows)
    findings.findings[0] = dataclasses.replace(
        findings.findings[0], key_region=(0, 0, rows + 1, 10)
    )
    with pytest.raises(ReportError, match="key region"):
        build_sr(sources, findings, templates, device)


def test_template_relabels_the_drawn_finding(
    sources: list[Dataset], device: DeviceIdentity, tmp_path: Path
) -> None:
    path = tmp_path / "body-region.yaml"
    text = _body_region_text().split("key_region:")[0]
    path.write_text(text + 'key_region: {label: "Region {predicted} ({head})", class_name: head}\n')
    sr = build_sr(sources, _findings(sources), {"body-region": load_template(path)}, device)
    ((num, _),) = _drawn(_groups(sr)[0])
    assert num.ConceptNameCodeSequence[0].CodeMeaning == "DEMO Region head (body-region)"
    assert float(num.MeasuredValueSequence[0].NumericValue) == pytest.approx(5.0)  # head


def test_regression_value_is_drawn_on_the_central_slice(
    sources: list[Dataset], device: DeviceIdentity, tmp_path: Path
) -> None:
    template_path = tmp_path / "brain-age.yaml"
    template_path.write_text(REGRESSION_TEMPLATE)
    finding = HeadFinding(
        head_name="brain-age",
        head_version="1.0.0",
        task="regression",
        classes=(HeadClass(name="age"),),
        probabilities=(47.25,),
        predicted_index=0,
    )
    findings = SeriesFindings(
        series_instance_uid=str(sources[0].SeriesInstanceUID),
        model=ModelIdentity(name="Curia-B", version="1.0", demo=False),
        findings=[finding],
        slice_count=len(sources),
        sop_instance_uids_sorted=[str(ds.SOPInstanceUID) for ds in sources],
    )
    sr = build_sr(sources, findings, {"brain-age": load_template(template_path)}, device)
    ((num, scoord),) = _drawn(_groups(sr)[0])
    assert num.ConceptNameCodeSequence[0].CodeMeaning == "Age"
    (image,) = [i for i in scoord.ContentSequence if i.ValueType == "IMAGE"]
    central = sources[len(sources) // 2].SOPInstanceUID
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == central


def test_trained_weights_carry_no_demo_statement(
    sources: list[Dataset], templates: dict[str, ReportTemplate], device: DeviceIdentity
) -> None:
    sr = build_sr(sources, _findings(sources, demo=False), templates, device)
    assert sr.SeriesDescription == "Curia AI results"
    assert DEMO_STATEMENT not in [i.TextValue for i in _items(sr, codes.DCM.Comment)]


def test_long_series_description_keeps_the_demo_warning(
    sources: list[Dataset], templates: dict[str, ReportTemplate], device: DeviceIdentity
) -> None:
    sr = build_sr(sources, _findings(sources), templates, device, series_description="x" * 80)
    assert len(sr.SeriesDescription) <= 64
    assert sr.SeriesDescription.endswith("NOT FOR DIAGNOSIS")


def test_uncoded_classes_take_the_template_codes(
    sources: list[Dataset], templates: dict[str, ReportTemplate], device: DeviceIdentity
) -> None:
    sr = build_sr(sources, _findings(sources, coded=False), templates, device)
    (group,) = _groups(sr)
    sites = [
        i.ConceptCodeSequence[0].CodeValue
        for i in group.ContentSequence
        if _name(i) == _key(codes.SCT.FindingSite)
    ]
    assert sites == [codes.SCT.Chest.value]


def test_class_without_any_code_is_refused(
    sources: list[Dataset], templates: dict[str, ReportTemplate], device: DeviceIdentity
) -> None:
    findings = _findings(sources, coded=False)
    finding = findings.findings[0]
    classes = (*finding.classes[:4], HeadClass(name="extremity"))
    findings.findings[0] = HeadFinding(
        **{**finding.__dict__, "classes": classes, "predicted_index": 0}
    )
    with pytest.raises(ReportError, match=r'class "extremity" has no code.*body-region\.yaml'):
        build_sr(sources, findings, templates, device)


def test_head_without_template_is_refused(sources: list[Dataset], device: DeviceIdentity) -> None:
    with pytest.raises(ReportError, match='no SR template for head "body-region"'):
        build_sr(sources, _findings(sources), {}, device)


def test_findings_for_another_series_are_refused(
    sources: list[Dataset], templates: dict[str, ReportTemplate], device: DeviceIdentity
) -> None:
    findings = _findings(sources)
    findings.series_instance_uid = generate_uid()
    with pytest.raises(ReportError, match="none of the sources"):
        build_sr(sources, findings, templates, device)


def test_supersedes_by_uid_is_noted_and_by_dataset_is_a_predecessor(
    sources: list[Dataset], templates: dict[str, ReportTemplate], device: DeviceIdentity
) -> None:
    first = build_sr(sources, _findings(sources), templates, device)
    by_uid = build_sr(
        sources, _findings(sources), templates, device, supersedes=first.SOPInstanceUID
    )
    notes = [i.TextValue for i in _items(by_uid, codes.DCM.Comment)]
    assert any(first.SOPInstanceUID in n for n in notes)
    by_ds = build_sr(sources, _findings(sources), templates, device, supersedes=first)
    ref = by_ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID


# --- deterministic UIDs --------------------------------------------------------------------


def _uids(ds: Dataset) -> tuple[str, str]:
    return str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _tracking_uids(sr: Dataset) -> list[str]:
    tracking = _key(codes.DCM.TrackingUniqueIdentifier)
    return [str(item.UID) for item in _walk(sr.ContentSequence) if _name(item) == tracking]


def test_derived_uids_are_valid_stable_and_keep_key_and_purpose_apart() -> None:
    uid = derived_uid("run-7:sr:0", "SR series")
    assert uid == derived_uid("run-7:sr:0", "SR series")
    assert pydicom.uid.UID(uid).is_valid
    assert uid != derived_uid("run-7:sr:0", "SR instance")
    assert derived_uid("ab", "c") != derived_uid("a", "bc")


def test_same_uid_key_gives_the_same_sr_uids(
    sources: list[Dataset], templates: dict[str, ReportTemplate], device: DeviceIdentity
) -> None:
    first = build_sr(sources, _findings(sources), templates, device, uid_key="run-7:sr:0")
    again = build_sr(sources, _findings(sources), templates, device, uid_key="run-7:sr:0")
    assert _uids(first) == _uids(again)
    assert len(set(_uids(first))) == 2
    assert _tracking_uids(first) and _tracking_uids(first) == _tracking_uids(again)


def test_different_uid_keys_give_different_sr_uids(
    sources: list[Dataset], templates: dict[str, ReportTemplate], device: DeviceIdentity
) -> None:
    first = build_sr(sources, _findings(sources), templates, device, uid_key="run-7:sr:0")
    other = build_sr(sources, _findings(sources), templates, device, uid_key="run-7:sr:1")
    assert set(_uids(first)).isdisjoint(_uids(other))
    assert set(_tracking_uids(first)).isdisjoint(_tracking_uids(other))


def test_without_uid_key_every_sr_gets_random_uids(
    sources: list[Dataset], templates: dict[str, ReportTemplate], device: DeviceIdentity
) -> None:
    first = build_sr(sources, _findings(sources), templates, device)
    other = build_sr(sources, _findings(sources), templates, device)
    assert set(_uids(first)).isdisjoint(_uids(other))
    assert set(_tracking_uids(first)).isdisjoint(_tracking_uids(other))


def test_a_given_series_uid_wins_over_the_uid_key(
    sources: list[Dataset], templates: dict[str, ReportTemplate], device: DeviceIdentity
) -> None:
    series = generate_uid()
    sr = build_sr(
        sources, _findings(sources), templates, device, series_instance_uid=series, uid_key="k"
    )
    assert _uids(sr) == (series, derived_uid("k", "SR instance"))


def test_device_identity_is_validated() -> None:
    with pytest.raises(ValueError, match="device_uid"):
        DeviceIdentity(
            model_name="m", software_version="1", device_uid="not-a-uid", device_name="n"
        )


BINARY_TEMPLATE = """\
head: nodule
tracking_identifier: Lung nodule
finding_type: {value: "27925004", scheme: SCT, meaning: Nodule}
finding_sites:
  - {value: "39607008", scheme: SCT, meaning: Lung}
presence:
  positive_class: nodule
  threshold: 0.5
  present: {value: "52101004", scheme: SCT, meaning: Present}
  absent: {value: "272519000", scheme: SCT, meaning: Absent}
probability:
  concept: {value: "122157", scheme: DCM, meaning: Probability}
  unit: {value: "1", scheme: UCUM, meaning: no units}
  classes: [nodule]
summary:
  concept: {value: "121111", scheme: DCM, meaning: Summary}
  pattern: "{head}: {predicted} ({probability:.1%})"
"""


def test_binary_head_reports_presence(
    sources: list[Dataset], device: DeviceIdentity, tmp_path: Path
) -> None:
    path = tmp_path / "nodule.yaml"
    path.write_text(BINARY_TEMPLATE)
    template = load_template(path)
    findings = _findings(sources, demo=False)
    findings.findings = [
        HeadFinding(
            head_name="nodule",
            head_version="2",
            task="classification",
            classes=(HeadClass("no nodule"), HeadClass("nodule")),
            probabilities=(0.3, 0.7),
            predicted_index=1,
        )
    ]
    # Neither class has a code: fine, this template states presence, not the class.
    sr = build_sr(sources, findings, {"nodule": template}, device)
    (group,) = _groups(sr)
    evaluation = [i for i in group.ContentSequence if _name(i) == ("27925004", "SCT")]
    assert evaluation[0].ConceptCodeSequence[0].CodeValue == codes.SCT.Present.value
    label, *nums = [i for i in group.ContentSequence if i.ValueType == "NUM"]
    assert [float(n.MeasuredValueSequence[0].NumericValue) for n in nums] == [0.7]
    # drawn for viewers: the positive class's probability, whatever the prediction
    assert label.ConceptNameCodeSequence[0].CodeMeaning == "nodule probability"
    assert float(label.MeasuredValueSequence[0].NumericValue) == pytest.approx(70.0)
    out = write_dataset(sr, tmp_path / "nodule-sr.dcm")
    assert_dciodvfy_clean(out)
    assert_dsrdump_clean(out)


# --- validators on the written SR ----------------------------------------------------------


def test_dciodvfy_accepts_the_sr(written_sr: Path) -> None:
    assert_dciodvfy_clean(written_sr)


def test_dsrdump_accepts_the_sr(written_sr: Path) -> None:
    dump = assert_dsrdump_clean(written_sr)
    assert "Imaging Measurement Report" in dump


@pytest.mark.slow
def test_pixelmed_sr_validator_accepts_the_sr(written_sr: Path) -> None:
    assert_pixelmed_sr_clean(written_sr)


def test_dcentvfy_accepts_sources_and_sr(ct_paths: list[Path], written_sr: Path) -> None:
    assert_dcentvfy_clean(ct_paths, [written_sr])


# --- template loading and refusals ---------------------------------------------------------


def test_shipped_templates_load(templates: dict[str, ReportTemplate]) -> None:
    assert set(templates) >= {"body-region"}
    body = templates["body-region"]
    assert body.probability is not None and body.probability.concept.value == "122157"
    assert body.source == TEMPLATES_DIR / "body-region.yaml"


def _refusal(tmp_path: Path, text: str) -> TemplateError:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TemplateError) as info:
        load_template(path)
    assert "bad.yaml" in str(info.value)
    return info.value


def _body_region_text() -> str:
    return (TEMPLATES_DIR / "body-region.yaml").read_text()


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    text = _body_region_text()
    text = "\n".join(line for line in text.splitlines() if not line.startswith("finding_type"))
    err = _refusal(tmp_path, text)
    assert err.field == "finding_type"
    assert "missing" in err.reason
    assert err.line is not None


def test_bad_sct_code_names_its_line(tmp_path: Path) -> None:
    text = _body_region_text().replace('"816094009"', '"816094008"')  # check digit typo
    err = _refusal(tmp_path, text)
    assert err.field == "class_codes.chest"
    assert err.line == _line_of(text, "816094008")
    assert "check digit" in err.reason
    assert f"bad.yaml:{err.line}" in str(err)


def test_wrong_scheme_and_non_ucum_unit_are_refused(tmp_path: Path) -> None:
    err = _refusal(tmp_path, _body_region_text().replace("scheme: SCT", "scheme: SRT", 1))
    assert "SCT" in err.reason
    err = _refusal(tmp_path, _body_region_text().replace("scheme: UCUM", "scheme: DCM"))
    assert err.field == "probability.unit"


def test_yaml_syntax_error_names_its_line(tmp_path: Path) -> None:
    text = _body_region_text().replace("classes: all", "classes: [all")
    err = _refusal(tmp_path, text)
    assert "syntax" in err.reason
    assert err.line is not None and err.line >= _line_of(text, "classes: [all")


def test_unknown_key_and_duplicate_key_are_refused(tmp_path: Path) -> None:
    text = _body_region_text().replace("tracking_identifier:", "tracking_identifer:")
    err = _refusal(tmp_path, text)
    assert "tracking_identifer" in str(err)
    text = _body_region_text() + "head: other\n"
    err = _refusal(tmp_path, text)
    assert "duplicate key 'head'" in err.reason
    assert err.line == len(text.splitlines())


def test_bad_summary_placeholder_is_refused(tmp_path: Path) -> None:
    text = _body_region_text().replace("{predicted}", "{region}")
    err = _refusal(tmp_path, text)
    assert err.field == "summary.pattern"
    assert "region" in err.reason


def test_ambiguous_probabilities_are_refused(tmp_path: Path) -> None:
    text = _body_region_text().replace("qualify_with_finding_site: true", "")
    err = _refusal(tmp_path, text)
    assert err.field == "probability"
    assert "cannot be told apart" in err.reason


def test_two_templates_for_one_head_are_refused(tmp_path: Path) -> None:
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text(_body_region_text())
    with pytest.raises(TemplateError, match=r"b\.yaml.*already has a template"):
        load_templates(tmp_path)


REGRESSION_TEMPLATE = """\
head: brain-age
tracking_identifier: Curia brain age
finding_type: {value: "363787002", scheme: SCT, meaning: Observable entity}
value:
  concept: {value: "397669002", scheme: SCT, meaning: Age}
  unit: {value: a, scheme: UCUM, meaning: year}
summary:
  concept: {value: "121111", scheme: DCM, meaning: Summary}
  pattern: "Estimated age: {probability:.1f} years"
"""


def test_regression_head_is_reported_as_a_numeric_value(
    sources: list[Dataset], device: DeviceIdentity, tmp_path: Path
) -> None:
    """A regression head's raw value becomes one NUM in its UCUM unit, validator-clean."""
    template_path = tmp_path / "brain-age.yaml"
    template_path.write_text(REGRESSION_TEMPLATE)
    template = load_template(template_path)
    findings = SeriesFindings(
        series_instance_uid=str(sources[0].SeriesInstanceUID),
        model=ModelIdentity(name="Curia-B", version="1.0", demo=False),
        findings=[
            HeadFinding(
                head_name="brain-age",
                head_version="1.0.0",
                task="regression",
                classes=(HeadClass(name="age"),),
                probabilities=(47.25,),
                predicted_index=0,
            )
        ],
        slice_count=len(sources),
        sop_instance_uids_sorted=[str(ds.SOPInstanceUID) for ds in sources],
    )
    path = write_dataset(
        build_sr(sources, findings, {"brain-age": template}, device), tmp_path / "r.dcm"
    )
    nums = [i for i in _walk(list(pydicom.dcmread(path).ContentSequence)) if i.ValueType == "NUM"]
    [age] = [n for n in nums if _name(n) == ("397669002", "SCT")]
    measured = age.MeasuredValueSequence[0]
    assert float(measured.NumericValue) == 47.25
    assert measured.MeasurementUnitsCodeSequence[0].CodeValue == "a"
    assert_dciodvfy_clean(path)
    assert_dsrdump_clean(path)


def test_value_section_is_refused_for_a_classifier(
    sources: list[Dataset], device: DeviceIdentity, tmp_path: Path
) -> None:
    template_path = tmp_path / "body-region.yaml"
    template_path.write_text(REGRESSION_TEMPLATE.replace("brain-age", "body-region"))
    templates = {"body-region": load_template(template_path)}
    with pytest.raises(ReportError, match="regression"):
        build_sr(sources, _findings(sources), templates, device)


def test_text_rendering_names_the_drawn_finding_and_its_outline(sr: Dataset) -> None:
    """What the dashboard's "View report" shows when no dsr2html is installed."""
    from node.web.results import render_text

    text = render_text(sr)
    assert "DEMO Chest probability: 70" in text and "%" in text
    assert "polyline (20, 10), (60, 10), (60, 40), (20, 40), (20, 10) (column, row) on" in text
    assert "NOT FOR DIAGNOSIS" in text.splitlines()[0]


def test_per_slice_aggregation_heads_not_run_and_stacks_set_aside_are_stated(
    sources: list[Dataset], templates: dict[str, ReportTemplate], device: DeviceIdentity
) -> None:
    findings = _findings(sources)
    findings.findings[0] = dataclasses.replace(
        findings.findings[0], aggregation="per-slice scores, max over 4 slices"
    )
    findings.heads_not_run["infarct"] = "not analysed: no mask"
    findings.set_aside.append("localizer (1 slice, 512x512): localizer")
    sr = build_sr(sources, findings, templates, device)
    params = [i.TextValue for i in _items(sr, codes.DCM.AlgorithmParameters)]
    assert "series value: per-slice scores, max over 4 slices" in params
    comments = [i.TextValue for i in _items(sr, codes.DCM.Comment)]
    assert "infarct: not analysed: no mask" in comments
    assert "Not analysed: localizer (1 slice, 512x512): localizer" in comments
    # the finding still points at its key slice
    assert findings.findings[0].key_slice == 1
