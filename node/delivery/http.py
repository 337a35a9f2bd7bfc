"""HTTP destinations: a DICOMweb STOW-RS service, and Orthanc's own REST API.

Both register with :func:`node.delivery.dimse.handler_for`, so a delivery to them goes through
:func:`node.delivery.dimse.send` like a DIMSE one. A send succeeds only when the destination
confirms every instance; anything else raises :class:`DispatchError` naming the
destination and the reason (never patient data). Retries are the delivery queue's job, so
the clients here make one attempt each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import httpx
import requests
from dicomweb_client import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pyorthanc import Orthanc

from node.delivery.dimse import DispatchError, checker_for, handler_for

log = logging.getLogger(__name__)

# Orthanc's answer to POST /instances for an instance it kept.
_ORTHANC_STORED = {"Success", "AlreadyStored"}


def _check_url(url: str, name: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f'Argument "url" of destination {name!r} must be an http(s) URL')
    return url.rstrip("/")


@dataclass(frozen=True)
class StowRsDestination:
    """A DICOMweb service root (e.g. ``https://pacs/dicom-web``) that takes STOW-RS."""

    name: str
    url: str
    token: str | None = field(default=None, repr=False)
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError('Argument "name" must not be empty')
        object.__setattr__(self, "url", _check_url(self.url, self.name))


@dataclass(frozen=True)
class OrthancRestDestination:
    """An Orthanc server, sent to with ``POST /instances`` (HTTP basic auth if given)."""

    name: str
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError('Argument "name" must not be empty')
        if (self.username is None) != (self.password is None):
            raise ValueError(f"destination {self.name!r}: give both username and password")
        object.__setattr__(self, "url", _check_url(self.url, self.name))


def _read(paths: list[Path], where: str) -> list[Dataset]:
    try:
        return [dcmread(path) for path in paths]
    except (OSError, InvalidDicomError) as exc:
        raise DispatchError(f"cannot read a file to send to {where}: {exc}") from exc


def _failure_reasons(body: bytes) -> str:
    """The FailedSOPSequence reasons of a STOW-RS error answer, if it has any."""
    try:
        answer = Dataset.from_json(body.decode())
    except (ValueError, TypeError, KeyError):
        return ""
    reasons = [f"0x{int(item.FailureReason):04X}" for item in answer.get("FailedSOPSequence", [])]
    return f" (failure reasons {', '.join(reasons)})" if reasons else ""


@handler_for(StowRsDestination)
def send_stow_rs(destination: StowRsDestination, paths: list[Path]) -> None:
    """Store ``paths`` in one STOW-RS request; every instance must come back referenced."""
    where = f"{destination.name} ({destination.url})"
    datasets = _read(paths, where)
    headers = {"Authorization": f"Bearer {destination.token}"} if destination.token else None
    with requests.Session() as session:
        client = DICOMwebClient(
            destination.url, session=session, headers=headers, timeout=destination.timeout
        )
        client.set_http_retry_params(retry=False)
        try:
            answer = client.store_instances(datasets)
        except requests.HTTPError as exc:
            response = exc.response
            code = response.status_code if response is not None else "no"
            details = _failure_reasons(response.content) if response is not None else ""
            raise DispatchError(f"{where} answered STOW-RS with HTTP {code}{details}") from exc
        except requests.RequestException as exc:
            raise DispatchError(f"{where} is unreachable: {type(exc).__name__}") from exc
        except ValueError as exc:  # an answer dicomweb-client cannot parse
            raise DispatchError(f"{where} gave an unreadable STOW-RS answer: {exc}") from exc
    failed = answer.get("FailedSOPSequence", [])
    stored = {
        str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence", [])
    }
    missing = [ds for ds in datasets if str(ds.SOPInstanceUID) not in stored]
    if failed or missing:
        reasons = sorted({f"0x{int(item.FailureReason):04X}" for item in failed})
        raise DispatchError(
            f"{where} stored {len(datasets) - len(missing)} of {len(datasets)} instance(s)"
            + (f"; failure reasons {', '.join(reasons)}" if reasons else "")
        )
    log.info("sent %d object(s) to %s by STOW-RS", len(datasets), where)


@handler_for(OrthancRestDestination)
def send_orthanc_rest(destination: OrthancRestDestination, paths: list[Path]) -> None:
    """Upload each file with ``POST /instances``; Orthanc must say it kept each one."""
    where = f"{destination.name} ({destination.url})"
    with Orthanc(
        destination.url,
        destination.username,
        destination.password,
        return_raw_response=True,
        timeout=destination.timeout,
    ) as client:
        for path in paths:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DispatchError(f"cannot read a file to send to {where}: {exc}") from exc
            try:
                response = client.post_instances(data)
            except httpx.HTTPError as exc:
                raise DispatchError(f"{where} is unreachable: {type(exc).__name__}") from exc
            response = cast(httpx.Response, response)  # return_raw_response=True
            if not response.is_success:
                raise DispatchError(f"{where} refused an instance with HTTP {response.status_code}")
            try:
                answer = response.json()
            except ValueError:
                answer = None
            stored = answer.get("Status") if isinstance(answer, dict) else None
            if stored not in _ORTHANC_STORED:
                raise DispatchError(f"{where} did not confirm storing an instance ({stored})")
    log.info("sent %d object(s) to %s by Orthanc REST", len(paths), where)


@checker_for(StowRsDestination)
def check_stow_rs(destination: StowRsDestination) -> str:
    """A QIDO-RS search for one study: proves the URL, the service and the token."""
    where = f"{destination.name} ({destination.url})"
    headers = {"Accept": "application/dicom+json"}
    if destination.token:
        headers["Authorization"] = f"Bearer {destination.token}"
    try:
        response = httpx.get(
            f"{destination.url}/studies",
            params={"limit": "1"},
            headers=headers,
            timeout=min(destination.timeout, 10.0),
        )
    except httpx.HTTPError as exc:
        raise DispatchError(f"{where} is unreachable: {type(exc).__name__}") from exc
    if response.status_code not in (200, 204):
        raise DispatchError(f"{where} answered a QIDO-RS search with HTTP {response.status_code}")
    return f"{where} answered QIDO-RS with HTTP {response.status_code}"


@checker_for(OrthancRestDestination)
def check_orthanc_rest(destination: OrthancRestDestination) -> str:
    """``GET /system``: proves the URL and the credentials; reports Orthanc's version."""
    where = f"{destination.name} ({destination.url})"
    auth = (destination.username, destination.password or "") if destination.username else None
    try:
        response = httpx.get(
            f"{destination.url}/system", auth=auth, timeout=min(destination.timeout, 10.0)
        )
    except httpx.HTTPError as exc:
        raise DispatchError(f"{where} is unreachable: {type(exc).__name__}") from exc
    if response.status_code != 200:
        raise DispatchError(f"{where} answered GET /system with HTTP {response.status_code}")
    try:
        version = response.json().get("Version", "?")
    except ValueError:
        version = "?"
    return f"{where} is Orthanc {version}"
