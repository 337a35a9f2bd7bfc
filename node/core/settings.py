"""The node's one typed configuration object.

Every component reads its configuration from :class:`Settings`, which merges (highest
priority first) ``CURIA_*`` environment variables (nested with ``__``, e.g.
``CURIA_DICOM__PORT=11112``), a TOML config file (``--config`` or ``CURIA_CONFIG``) and the
defaults below. The defaults are the embedded mode: everything under one data folder, no
server needed.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from node.core.masking import mask_url, mask_value
from node.core.permissions import restrict
from node.core.uids import validate_ae_title

_CONFIG_FILE: ContextVar[str | None] = ContextVar("curia_config_file", default=None)


def packaged_templates_dir() -> Path:
    """The SR templates that ship with the node, the default ``templates_dir``.

    They are package data (``sr_templates``), so a wheel or image install finds them just as
    the source tree and the editable install do. Wheels install unzipped: the package is a
    folder on disk, which the template loader and a site's own folder have in common.
    """
    folder = resources.files("sr_templates")
    if not isinstance(folder, Path):
        raise RuntimeError(f"the packaged SR templates are not a folder on disk: {folder}")
    return folder


class TlsSettings(BaseModel):
    """DICOM TLS (PS3.15 B.9 / BCP 195): TLS 1.2 or newer on the listener."""

    enabled: bool = False
    cert_file: Path | None = Field(None, description="server certificate (PEM)")
    key_file: Path | None = Field(None, description="server private key (PEM)")
    ca_file: Path | None = Field(None, description="CAs whose client certificates are trusted")
    require_client_cert: bool = Field(False, description="refuse clients without a valid cert")

    @model_validator(mode="after")
    def _files(self) -> TlsSettings:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("dicom.tls.enabled needs cert_file and key_file")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("dicom.tls.require_client_cert needs ca_file")
        return self


ReportAssociation = Literal["same_association", "new_association", "same_then_new"]


class ReportAddress(BaseModel):
    """How a storage commitment requester takes its N-EVENT-REPORT, and where it listens.

    ``association`` (PS3.4 J.3.3): ``new_association`` (the default, the one way every
    requester must accept, J.3.3.1.3) opens an association to ``host:port`` proposing the
    SCP role; ``same_association`` sends it on an association the requester itself holds
    open (the one that carried the N-ACTION, or a later one), and waits for one if none is;
    ``same_then_new`` uses the requester's open association while there is one, else a new
    association.
    """

    model_config = ConfigDict(extra="forbid")

    association: ReportAssociation = Field(
        "new_association", description="which association carries the report"
    )
    host: str | None = Field(None, description="none = the address the request came from")
    port: int | None = Field(None, ge=1, le=65535, description="needed unless same_association")
    ae_title: str | None = Field(None, description="none = the requester's calling AE title")

    @model_validator(mode="after")
    def _port(self) -> ReportAddress:
        if self.port is None and self.association != "same_association":
            raise ValueError(f"port is needed: {self.association} opens an association")
        return self

    @property
    def on_requester_association(self) -> bool:
        """Whether the report may go on an association the requester opened."""
        return self.association != "new_association"

    @property
    def on_new_association(self) -> bool:
        """Whether the report may go on an association the node opens."""
        return self.association != "same_association"


class CommitmentSettings(BaseModel):
    """Storage Commitment Push Model SCP (PS3.4 J): what the node commits, and whom it tells.

    The node commits an instance only when it is durably stored and catalogued; with
    ``after_archived`` only once its series has also been forwarded to a destination. The
    answer (N-EVENT-REPORT) goes on a new association to ``report_to[<calling AE>]``; a
    request from an AE without an entry is refused, because its answer could never arrive.
    """

    after_archived: bool = Field(
        False, description="commit an instance only once its series is forwarded to the archive"
    )
    report_to: dict[str, ReportAddress] = Field(
        default_factory=dict, description="calling AE title -> where its reports go"
    )
    retry_seconds: float = Field(5.0, gt=0.0, description="wait before retrying a report")
    archive_wait_seconds: float = Field(
        600.0, ge=0.0, description="with after_archived: longest wait before reporting failure"
    )
    poll_seconds: float = Field(1.0, gt=0.0)

    @field_validator("report_to")
    @classmethod
    def _titles(cls, value: dict[str, ReportAddress]) -> dict[str, ReportAddress]:
        return {validate_ae_title(title): address for title, address in value.items()}


class MppsForwardSettings(BaseModel):
    """A RIS or PACS that also wants the modalities' MPPS: every N-CREATE and N-SET the node
    accepts is forwarded to it, in order, retried until it is taken."""

    ae_title: str
    host: str
    port: int = Field(..., ge=1, le=65535)
    retry_seconds: float = Field(10.0, gt=0.0)
    retention_days: float = Field(
        30.0, gt=0.0, description="forwarded records are kept this long, then removed"
    )

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return validate_ae_title(value)


class DicomSettings(BaseModel):
    """The DIMSE listener (C-ECHO / C-STORE SCP, MPPS SCP, Storage Commitment SCP)."""

    ae_title: str = "CURIA"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    accept_any_source: bool = Field(
        False, description="accept any calling AE title and address (off: allow-list only)"
    )
    duplicate_policy: Literal["keep_first", "replace"] = Field(
        "keep_first", description="a known SOP Instance UID arriving with different bytes"
    )
    accept_unknown_storage: bool = Field(
        False,
        description="also store objects of private or unknown storage SOP classes "
        "(off: every storage class of PS3.4 is accepted, others are refused)",
    )
    min_free_mb: int = Field(
        1024, ge=0, description="below this free space in the data folder, refuse to store"
    )
    tls: TlsSettings = TlsSettings()
    max_associations: int = Field(16, ge=1, description="associations served at once")
    max_connections: int = Field(
        64, ge=1, description="TCP connections open at once, associated or not (one thread each)"
    )
    max_connections_per_address: int = Field(
        32, ge=1, description="TCP connections open at once from one IP address"
    )
    max_pdu: int = Field(
        262144,
        ge=4096,
        le=1 << 24,
        description="largest PDU accepted (advertised); a larger one ends the association",
    )
    refusal_retention_days: float = Field(
        90.0, gt=0.0, description="refused-association tallies are kept this long"
    )
    max_instance_mb: int = Field(
        1024, ge=1, description="largest C-STORE data set; a larger one gets 0xA700"
    )
    instance_memory_mb: int = Field(
        32, ge=1, description="a C-STORE data set larger than this is written to disk as it comes"
    )
    acse_timeout: float = Field(
        30.0, gt=0.0, description="seconds from connect to a complete A-ASSOCIATE-RQ"
    )
    dimse_timeout: float = Field(
        60.0, description="seconds of silence between the PDUs of one message (0: no limit)"
    )
    network_timeout: float = Field(
        60.0,
        description="seconds of silence before a PDU, and for a PDU begun to arrive whole"
        " (0: no limit)",
    )
    commitment: CommitmentSettings = CommitmentSettings()
    mpps_forward: MppsForwardSettings | None = Field(
        None, description="forward every accepted MPPS N-CREATE / N-SET to this AE"
    )

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return validate_ae_title(value)


class ArchiveSettings(BaseModel):
    """Where results go: the PACS that receives the node's SR and SEG objects."""

    enabled: bool = True
    protocol: Literal["dimse", "stow-rs", "orthanc-rest"] = Field(
        "dimse", description="C-STORE, DICOMweb STOW-RS, or Orthanc's REST API"
    )
    url: str | None = Field(None, description="base URL for stow-rs / orthanc-rest")
    token: SecretStr | None = Field(None, description="bearer token for stow-rs")
    username: str | None = Field(None, description="user for orthanc-rest")
    password: SecretStr | None = Field(None, description="password for orthanc-rest")
    ae_title: str = "ORTHANC"
    host: str = "127.0.0.1"
    port: int = Field(4242, ge=1, le=65535)
    calling_ae_title: str | None = Field(
        None, description="AE title the node calls from; defaults to dicom.ae_title"
    )

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return validate_ae_title(value)


class DeliverySettings(BaseModel):
    """Retries of a failed send: exponential backoff, then the dead-letter state."""

    max_attempts: int = Field(8, ge=1, description="sends before a delivery is dead-lettered")
    backoff_seconds: float = Field(2.0, gt=0.0, description="first wait; doubles each time")
    backoff_max_seconds: float = Field(300.0, gt=0.0)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.backoff_seconds * 2.0 ** (attempt - 1), self.backoff_max_seconds)


class SourceSignals(BaseModel):
    """Completion signals the node trusts from one sender (keyed by its calling AE title).

    MPPS is always used when a modality sends it. The others are only as reliable as the
    sender, so each is off until turned on for a source known to behave that way.
    """

    model_config = ConfigDict(extra="forbid")

    association_end: bool = Field(
        False, description="the sender sends each series whole on one association"
    )
    instance_count: bool = Field(
        False, description="the sender fills ImagesInAcquisition with the series' size"
    )
    multiframe: bool = Field(
        False, description="a multi-frame object whose dimension index is full is the series"
    )


class CompletionSettings(BaseModel):
    """When a series counts as complete, and what happens to instances that come later.

    A series is complete when it has had no new instance for ``series_quiet_seconds`` and,
    if ``study_quiet_seconds`` is set, its whole study none for that long; and, if
    ``required_series`` is set, when its study has a series matching each of those
    conditions (routing-rule conditions, e.g. ``{modality = "CT", orientation = "axial",
    min_slices = 50}``). ``force_seconds`` after the study's first instance the node stops
    waiting for required series and applies ``force_action``.

    ``late_instances``: instances arriving after a series was completed either trigger one
    re-run once the series is quiet again and its current run has ended (``rerun``: the new
    SR supersedes the previous one, forwards are re-sent), or are only stored (``append``).

    ``sources``: the completion signals trusted from each sender (by calling AE title), which
    complete a series without waiting for its quiet period; MPPS is always used.
    """

    series_quiet_seconds: float = Field(10.0, ge=0.0)
    study_quiet_seconds: float = Field(0.0, ge=0.0, description="0 = judge each series alone")
    required_series: list[dict[str, Any]] = Field(
        default_factory=list, description="conditions a study must meet before it is analysed"
    )
    force_seconds: float | None = Field(None, gt=0.0)
    force_action: Literal["process", "discard"] = "process"
    late_instances: Literal["rerun", "append"] = "rerun"
    poll_seconds: float = Field(1.0, gt=0.0)
    sources: dict[str, SourceSignals] = Field(
        default_factory=dict, description="calling AE title -> completion signals trusted"
    )

    @field_validator("sources")
    @classmethod
    def _titles(cls, value: dict[str, SourceSignals]) -> dict[str, SourceSignals]:
        return {validate_ae_title(title): signals for title, signals in value.items()}

    @field_validator("required_series")
    @classmethod
    def _conditions(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from node.core.rules import Condition

        for item in value:
            condition = Condition.model_validate(item)
            if condition.uses_findings():
                raise ValueError("a required series is known before inference: no 'finding'")
        return value


class ModelSettings(BaseModel):
    """The Curia backbone and the heads to run."""

    weights_dir: Path | None = Field(
        None, description="local Hugging Face-layout folder; none = labelled demo weights"
    )
    demo_size: Literal["base", "tiny"] = Field(
        "base", description="demo architecture: the real Curia-B, or a scaled-down copy"
    )
    heads_dir: Path | None = Field(
        None, description="folder of head packages; none = the built-in demo heads"
    )
    mask_heads_dir: Path | None = Field(
        None, description="folder of mask-head packages (SEG); none = demo one with demo heads"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    compile: bool = Field(False, description="torch.compile the backbone (faster on a GPU)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="backbone arithmetic: fp32 as Raidium runs it, or autocast to bf16 / fp16 "
        "(faster on a GPU; effect measured by benchmarks/precision.py)",
    )
    batch_size: int = Field(16, ge=1)
    seed: int = 0


class PipelineSettings(BaseModel):
    """Celery: the broker, the worker mode and queue names."""

    broker_url: str | None = Field(
        None, description="none = embedded SQLite transport under the data folder"
    )
    embedded_worker: bool = Field(True, description="run a worker thread inside `curia-node run`")
    queue_prefix: str = "curia"

    @field_validator("queue_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
            raise ValueError("queue_prefix may hold only letters, digits, '_', '.', '-'")
        return value


class ApiSettings(BaseModel):
    """The HTTP API and dashboard."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    token: SecretStr | None = Field(
        None, description="admin bearer token; none = generated once into the data folder"
    )
    docs: bool = Field(True, description="serve /docs and /openapi.json (token required)")
    stow_max_part_mb: int = Field(512, ge=1, description="largest STOW-RS part accepted")
    stow_memory_mb: int = Field(
        64, ge=1, description="STOW-RS part data a request keeps in memory before spilling"
    )
    stow_max_body_mb: int = Field(
        4096, ge=1, description="largest STOW-RS request body; a larger one gets 413"
    )
    stow_max_parts: int = Field(
        10000, ge=1, description="most parts in one STOW-RS request; more get 413"
    )


class NodeIdentitySettings(BaseModel):
    """How the node names itself in the objects it writes."""

    manufacturer: str = "Curia Node"
    model_name: str = "Curia Node"
    device_uid: str | None = Field(
        None, description="none = generated once and kept in the data folder"
    )
    institution_name: str | None = None


class Settings(BaseSettings):
    """Effective configuration of one node."""

    model_config = SettingsConfigDict(
        env_prefix="CURIA_",
        env_nested_delimiter="__",
        extra="forbid",
        toml_file=None,
    )

    data_dir: Path = Field(Path("curia-data"), description="spool, catalogue, broker, keys")
    database_url: str | None = Field(None, description="none = SQLite in the data folder")
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = Field("text", description="json: one object per line")
    quarantine_max_age_days: float = Field(
        30.0, gt=0.0, description="refused instances are kept this long"
    )
    quarantine_max_mb: int = Field(
        1024, ge=1, description="past this size the oldest days of the quarantine go first"
    )
    dicom: DicomSettings = DicomSettings()
    archive: ArchiveSettings = ArchiveSettings()
    completion: CompletionSettings = CompletionSettings()
    delivery: DeliverySettings = DeliverySettings()
    model: ModelSettings = ModelSettings()
    pipeline: PipelineSettings = PipelineSettings()
    api: ApiSettings = ApiSettings()
    identity: NodeIdentitySettings = NodeIdentitySettings()
    templates_dir: Path = Field(default_factory=packaged_templates_dir)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = _CONFIG_FILE.get() or os.environ.get("CURIA_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    # Derived locations: one data folder holds everything in embedded mode.
    @cached_property
    def data_path(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def spool_dir(self) -> Path:
        return self.data_path / "spool"

    @property
    def results_dir(self) -> Path:
        return self.data_path / "results"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_path / "quarantine"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_path / 'catalogue.sqlite'}"

    @property
    def effective_broker_url(self) -> str:
        embedded = f"curia-sqla+sqlite:///{self.data_path / 'broker.sqlite'}"
        return self.pipeline.broker_url or embedded

    @property
    def is_embedded_broker(self) -> bool:
        return self.pipeline.broker_url is None

    def ensure_dirs(self) -> None:
        """Create the data folders, private to the node's user (0700, files 0600 whatever
        the umask); called once at start, never on a hot path."""
        folders = (self.spool_dir, self.results_dir, self.quarantine_dir)
        restrict(self.data_path)
        for path in (self.data_path, *folders):
            path.mkdir(parents=True, exist_ok=True)
        restrict(self.data_path, folders)

    def masked(self) -> dict[str, Any]:
        """The configuration as a dict with every secret masked, for `config show`."""
        data = self.model_dump(mode="json")
        data["database_url"] = mask_url(self.effective_database_url)
        data["pipeline"]["broker_url"] = mask_url(self.effective_broker_url)
        data["data_dir"] = str(self.data_path)
        if data["archive"].get("url"):
            data["archive"]["url"] = mask_url(data["archive"]["url"])
        for section, key in (("api", "token"), ("archive", "token"), ("archive", "password")):
            data[section][key] = mask_value(data[section].get(key))
        return data


def load_settings(config_file: Path | None = None) -> Settings:
    """Load settings, optionally from an explicit TOML file (else ``CURIA_CONFIG``)."""
    if config_file is None:
        return Settings()
    if not config_file.is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")
    token = _CONFIG_FILE.set(str(config_file))
    try:
        return Settings()
    finally:
        _CONFIG_FILE.reset(token)
