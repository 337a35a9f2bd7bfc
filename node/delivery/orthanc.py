"""An Orthanc destination: its own REST API, ``POST /instances`` to send, ``GET /system``
to check."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import httpx
from pyorthanc import Orthanc

from node.delivery.transport import DispatchError, check_url

log = logging.getLogger(__name__)

# Orthanc's answer to POST /instances for an instance it kept.
_ORTHANC_STORED = {"Success", "AlreadyStored"}


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
        object.__setattr__(self, "url", check_url(self.url, self.name))

    def where(self) -> str:
        return f"{self.name} ({self.url})"

    def send(self, paths: list[Path]) -> None:
        """Upload each file with ``POST /instances``; Orthanc must say it kept each one."""
        where = self.where()
        with Orthanc(
            self.url,
            self.username,
            self.password,
            return_raw_response=True,
            timeout=self.timeout,
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
                    raise DispatchError(
                        f"{where} refused an instance with HTTP {response.status_code}"
                    )
                try:
                    answer = response.json()
                except ValueError:
                    answer = None
                stored = answer.get("Status") if isinstance(answer, dict) else None
                if stored not in _ORTHANC_STORED:
                    raise DispatchError(f"{where} did not confirm storing an instance ({stored})")
        log.info("sent %d object(s) to %s by Orthanc REST", len(paths), where)

    def check(self) -> str:
        """``GET /system``: proves the URL and the credentials; reports Orthanc's version."""
        where = self.where()
        auth = (self.username, self.password or "") if self.username else None
        try:
            response = httpx.get(f"{self.url}/system", auth=auth, timeout=min(self.timeout, 10.0))
        except httpx.HTTPError as exc:
            raise DispatchError(f"{where} is unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise DispatchError(f"{where} answered GET /system with HTTP {response.status_code}")
        try:
            version = response.json().get("Version", "?")
        except ValueError:
            version = "?"
        return f"{where} is Orthanc {version}"
