"""Who made a result: the node as equipment, and the algorithm (backbone + head).

An SR group and a SEG segment name their algorithm with the same words, which is what
lets the SR find the segment a mask head produced; a result must also trace to the exact
weights and say when they were demo ones.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipelines.findings import HeadFinding, ModelIdentity
from pipelines.reporting.content import LO_MAX, is_uid

__all__ = [
    "DeviceIdentity",
    "algorithm_identification",
    "algorithm_name",
    "algorithm_parameters",
    "algorithm_version",
    "ihe_air_equipment",
]

# IHE AI Results (AIR) purpose of reference of the processing algorithm's equipment;
# pydicom's code dictionary has no entry for it.
_IHE_PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")


@dataclass(frozen=True, kw_only=True)
class DeviceIdentity:
    """The node as the equipment that made the SR (observer device, equipment, AIR).

    Keyword-only so that the several string fields cannot be swapped by position.
    """

    manufacturer: str = "Curia Node"
    model_name: str
    software_version: str
    device_uid: str
    device_name: str
    institution_name: str | None = None

    def __post_init__(self) -> None:
        for name in ("manufacturer", "model_name", "software_version", "device_name"):
            value = getattr(self, name)
            if not value or len(value) > LO_MAX or "\\" in value:
                raise ValueError(
                    f'DeviceIdentity "{name}" must be 1-{LO_MAX} characters without '
                    f"backslash, got {value!r}"
                )
        if self.institution_name is not None and len(self.institution_name) > LO_MAX:
            raise ValueError(f'DeviceIdentity "institution_name" longer than {LO_MAX}')
        if not is_uid(self.device_uid):
            raise ValueError(f'DeviceIdentity "device_uid" is not a valid UID: {self.device_uid!r}')


def algorithm_name(model: ModelIdentity, head_name: str) -> str:
    """Backbone and head, as every SR group and SEG segment names its algorithm.

    One spelling everywhere is what lets an SR find the segment a head produced.
    """
    return f"{model.name} + {head_name}"


def algorithm_version(model: ModelIdentity, head_version: str) -> str:
    """Backbone and head versions, in the same order as :func:`algorithm_name`."""
    return f"{model.version} / {head_version}"


def algorithm_parameters(model: ModelIdentity, demo: bool) -> list[str]:
    """Free-text parameters that pin the exact weights and flag demo ones."""
    parameters: list[str] = []
    if model.weights_digest:
        parameters.append(f"backbone weights digest: {model.weights_digest}")
    if model.demo or demo:
        parameters.append("weights: demo (random, untrained); not for diagnosis")
    return parameters


def algorithm_identification(
    model: ModelIdentity, finding: HeadFinding, device: DeviceIdentity
) -> hd.sr.AlgorithmIdentification:
    """TID 4019 naming backbone and head, so a result traces to the exact weights."""
    parameters = algorithm_parameters(model, finding.demo)
    if finding.aggregation:  # a per-slice head: how its series value was made
        parameters.append(f"series value: {finding.aggregation}")
    if finding.mask_from:  # a mask-pooled head fed by the study's own segmentation
        parameters.append(f"mask: {finding.mask_from}")
    return hd.sr.AlgorithmIdentification(
        name=algorithm_name(model, finding.head_name),
        version=algorithm_version(model, finding.head_version),
        family=codes.cid7162.ArtificialIntelligence,
        manufacturer=device.manufacturer,
        parameters=parameters or None,
    )


def ihe_air_equipment(
    device: DeviceIdentity,
    now: datetime.datetime,
    description: str = "AI classification results",
) -> Dataset:
    """IHE AIR ContributingEquipmentSequence item (highdicom refuses this purpose code)."""
    item = Dataset()
    item.Manufacturer = device.manufacturer
    if device.institution_name:
        item.InstitutionName = device.institution_name
    item.ManufacturerModelName = device.model_name
    item.SoftwareVersions = device.software_version
    item.DeviceUID = device.device_uid
    item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    item.ContributionDescription = description
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(_IHE_PROCESSING_ALGORITHM)]
    return item
