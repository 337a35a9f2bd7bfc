"""A DICOMweb destination: STOW-RS to a service root, a QIDO-RS search to check it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import requests
from dicomweb_client import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.delivery.transport import DispatchError, check_url

log = logging.getLogger(__name__)


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
        object.__setattr__(self, "url", check_url(self.url, self.name))

    def where(self) -> str:
        return f"{self.name} ({self.url})"

    def send(self, paths: list[Path]) -> None:
        """Store ``paths`` in one STOW-RS request; every instance must come back referenced."""
        where = self.where()
        datasets = _read(paths, where)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        with requests.Session() as session:
            client = DICOMwebClient(
                self.url, session=session, headers=headers, timeout=self.timeout
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

    def check(self) -> str:
        """A QIDO-RS search for one study: proves the URL, the service and the token."""
        where = self.where()
        headers = {"Accept": "application/dicom+json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            response = httpx.get(
                f"{self.url}/studies",
                params={"limit": "1"},
                headers=headers,
                timeout=min(self.timeout, 10.0),
            )
        except httpx.HTTPError as exc:
            raise DispatchError(f"{where} is unreachable: {type(exc).__name__}") from exc
        if response.status_code not in (200, 204):
            raise DispatchError(
                f"{where} answered a QIDO-RS search with HTTP {response.status_code}"
            )
        return f"{where} answered QIDO-RS with HTTP {response.status_code}"


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
