"""DICOM JSON (PS3.18 Annex F) and XML (PS3.19 Native DICOM Model) answers, and picking the
one a client accepts."""

from __future__ import annotations

import json
from typing import Any
from xml.etree.ElementTree import Element, SubElement, tostring

from fastapi import HTTPException, status
from fastapi.responses import Response
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset

from node.dicomweb.common import DICOM_JSON
from node.dicomweb.multipart import parse_accept

_NATIVE_DICOM = "http://dicom.nema.org/PS3.19/models/NativeDICOM"


def dicom_json(ds: Dataset) -> dict[str, Any]:
    return ds.to_json_dict(suppress_invalid_tags=True)


def json_to_xml(model: dict[str, Any]) -> bytes:
    """A DICOM JSON object as a PS3.19 Native DICOM Model document."""
    root = Element("NativeDicomModel", xmlns=_NATIVE_DICOM)
    _xml_attributes(root, model)
    document: bytes = tostring(root, encoding="utf-8", xml_declaration=True)
    return document


def _xml_attributes(parent: Element, model: dict[str, Any]) -> None:
    for tag, element in sorted(model.items()):
        vr = element["vr"]
        attrs = {"tag": tag, "vr": vr}
        keyword = keyword_for_tag(int(tag, 16))
        if keyword:
            attrs["keyword"] = keyword
        node = SubElement(parent, "DicomAttribute", attrs)
        if "InlineBinary" in element:
            SubElement(node, "InlineBinary").text = element["InlineBinary"]
        elif "BulkDataURI" in element:
            SubElement(node, "BulkData", uri=element["BulkDataURI"])
        for number, value in enumerate(element.get("Value", []), start=1):
            if vr == "SQ":
                _xml_attributes(SubElement(node, "Item", number=str(number)), value)
            elif vr == "PN":
                _xml_person_name(SubElement(node, "PersonName", number=str(number)), value)
            else:
                text = "" if value is None else str(value)
                SubElement(node, "Value", number=str(number)).text = text


def _xml_person_name(parent: Element, value: dict[str, str]) -> None:
    parts = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
    for group in ("Alphabetic", "Ideographic", "Phonetic"):
        if value.get(group):
            node = SubElement(parent, group)
            for name, text in zip(parts, value[group].split("^"), strict=False):
                if text:
                    SubElement(node, name).text = text


def negotiate(accept: str | None, offers: list[str]) -> str:
    """The first of ``offers`` (most preferred by the server first) the client accepts."""
    for media in parse_accept(accept):
        for offer in offers:
            if media.type in (offer, "*/*", offer.split("/")[0] + "/*"):
                return offer
            if media.type == "application/json" and offer == DICOM_JSON:
                return offer
    raise HTTPException(status.HTTP_406_NOT_ACCEPTABLE, f"can answer only {', '.join(offers)}")


def json_response(body: Any, code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), code, headers=headers, media_type=DICOM_JSON)
