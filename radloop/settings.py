"""One validated settings tree for every radloop process.

Sources, highest first: keyword arguments, environment (`RADLOOP_` prefix, `__` for nesting,
e.g. `RADLOOP_DICOM__PORT`), the YAML file named by `RADLOOP_CONFIG` (default
`configs/radloop.yaml`), then the defaults on the models below — the only place defaults live.
"""

from __future__ import annotations

import logging
import os
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from sqlalchemy.engine import make_url

from radloop.dicom_settings import DicomSettings, Section, TlsSettings
from radloop.objectstore import LocalFolder, ObjectStore, ObjectStoreSettings, triton_location
from radloop.settings_errors import (
    ENV_PREFIX,
    PLACEHOLDER_SECRETS,
    SettingsError,
    describe_errors,
)

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGED_CONFIG = PROJECT_ROOT / "configs" / "radloop.yaml"
# The @ohif/app release scripts/bootstrap fetches (pinned there with its integrity).
OHIF_VERSION = "3.13.2"
# The monailabel wheel whose prebuilt OHIF (with the MONAI Label panel) scripts/bootstrap
# unpacks (pinned there with its hash).
MONAILABEL_VERSION = "0.8.5"


class OrthancSettings(Section):
    # Unset: `radloop up` starts its own Orthanc on the ports below.
    url: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    http_port: int = Field(8042, ge=1, le=65535)
    dicom_port: int = Field(4242, ge=1, le=65535)
    ae_title: str = "ORTHANC"
    stable_age_seconds: int = Field(10, ge=1)
    follow: bool = True
    poll_seconds: float = Field(1.0, gt=0)

    @property
    def base_url(self) -> str:
        return self.url or f"http://127.0.0.1:{self.http_port}"


class WatchSettings(Section):
    enabled: bool = True
    # Unset: `<data_dir>/incoming` and `<data_dir>/rejected`.
    folder: Path | None = None
    rejected_folder: Path | None = None
    settle_seconds: float = Field(2.0, gt=0)


class PrefectSettings(Section):
    # Unset: `radloop up` starts a local Prefect server on `port`.
    api_url: str | None = None
    port: int = Field(4200, ge=1, le=65535)

    @property
    def effective_api_url(self) -> str:
        return self.api_url or f"http://127.0.0.1:{self.port}/api"


class TritonSettings(Section):
    # Unset: `radloop up` starts the `tritonserver` of the nvidia-pytriton wheel on these ports.
    url: str | None = None
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(8001, ge=1, le=65535)
    metrics_port: int = Field(8002, ge=1, le=65535)
    # Unset: `<shared_dir>/model-repository` (on the object store when `object_store.url` is set).
    repository: Path | None = None
    timeout_seconds: float = Field(300.0, gt=0)

    @property
    def base_url(self) -> str:
        return self.url or f"http://127.0.0.1:{self.http_port}"


class AnnotationSettings(Section):
    """Drafting a completed study (by `radloop worker --queue annotate`) and putting it where
    readers open it."""

    # Attempts after the first while Triton, Orthanc or the disk is unavailable; the delay
    # doubles each time (2, 4, 8 … s with the default). Then the study is queued for readers
    # without a draft, with the reason.
    retries: int = Field(8, ge=0)
    retry_delay_seconds: float = Field(2.0, gt=0)
    # How often `radloop up` stores images of cases that are not yet in the viewer's Orthanc.
    viewer_retry_seconds: float = Field(15.0, gt=0)
    # A job not started within this, or whose worker stopped renewing it, is submitted again
    # (waiting ones back off to 10 min). Workers renew it every quarter lease.
    job_lease_seconds: float = Field(60.0, gt=0)
    # Studies one `radloop worker` drafts at once (overlaps I/O with another's inference).
    worker_concurrency: int = Field(2, ge=1)


class OutboxSettings(Section):
    poll_seconds: float = Field(0.5, gt=0)
    batch_size: int = Field(100, ge=1)
    max_backoff_seconds: float = Field(60.0, gt=0)
    # A claimed batch is sent again, by any dispatcher, once this has passed without its
    # delivery being recorded (its dispatcher died mid-request). Longer than Prefect's answer.
    lease_seconds: float = Field(60.0, gt=0)


class ReviewSettings(Section):
    """The review service: worklist, REST API, OHIF host and DICOMweb proxy."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # Address readers type in their browser, when it is not http://host:port (reverse proxy).
    public_url: str | None = None
    # A claim returns the case to the worklist after this long without a save.
    lease_minutes: float = Field(30.0, gt=0)
    # True: a reader's save validates the label; false: a second person (reviewer) validates.
    single_reader: bool = False
    # Fraction of validated labels that go to the frozen holdout, decided once per study.
    holdout_fraction: float = Field(0.2, ge=0, le=1)
    session_hours: float = Field(12.0, gt=0)
    # Send cookies only over HTTPS: set when the service sits behind a TLS proxy (implied by
    # `tls`).
    secure_cookies: bool = False
    # The site's certificate and key (RADLOOP_REVIEW__TLS__CERT_FILE, __KEY_FILE): the service
    # then speaks HTTPS only, with Secure cookies and HSTS.
    tls: TlsSettings | None = None
    # This many failed logins in a row lock a user name out for `lockout_minutes`; a client
    # address, four times as many (whatever names it tries).
    login_attempts: int = Field(5, ge=1)
    lockout_minutes: float = Field(15.0, gt=0)
    # Unset: the viewer `make install` fetched (`.cache/ohif-<version>/dist`).
    ohif_dir: Path | None = None
    # Unset: the OHIF build with MONAI Label's panel from the monailabel wheel `make install`
    # fetched, served at /ohif/ ("Open with AI tools").
    ohif_ai_dir: Path | None = None

    @field_validator("tls")
    @classmethod
    def _no_client_certificates(cls, value: TlsSettings | None) -> TlsSettings | None:
        if value is not None and value.ca_file is not None:
            raise ValueError(
                "the review service does not ask browsers for certificates (ca_file): "
                "put a TLS proxy that does in front of it"
            )
        return value

    @property
    def local_url(self) -> str:
        """Where the service answers on its own host (http, or https with `tls`)."""
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return (self.public_url or self.local_url).rstrip("/")

    @property
    def cookies_secure(self) -> bool:
        return self.secure_cookies or self.tls is not None


class MlflowSettings(Section):
    # Unset: `radloop up` starts `mlflow server` on `port` with a SQLite backend and an
    # artifact folder under the data dir.
    tracking_uri: str | None = None
    port: int = Field(5000, ge=1, le=65535)

    @property
    def effective_tracking_uri(self) -> str:
        return self.tracking_uri or f"http://127.0.0.1:{self.port}"


class WorkPoolType(StrEnum):
    """Prefect worker types radloop's training runs on (prefect, prefect-docker,
    prefect-kubernetes)."""

    PROCESS = "process"
    DOCKER = "docker"
    KUBERNETES = "kubernetes"


class RetrainSettings(Section):
    # Prefect cron schedule of the retraining that runs when any new labels exist.
    schedule: str = "0 2 * * *"
    timezone: str = "UTC"
    # `radloop train --wait` gives up (exit 1) when the run is not decided in this long.
    wait_timeout_seconds: float = Field(3600.0, gt=0)
    # The Prefect work pool `radloop worker --queue train` serves, created if missing.
    work_pool: str = "radloop-train"
    # What runs each training: `process` a process beside the worker (its host's GPU);
    # `kubernetes` a Job, `docker` a container, each with a GPU of its own (deploy/).
    work_pool_type: WorkPoolType = WorkPoolType.PROCESS
    # The pool's base job template (JSON), kept equal to this file at each start; unset:
    # Prefect's default for the type when the pool is created, left alone afterwards.
    work_pool_template: Path | None = None


class SupervisorSettings(Section):
    """How `radloop up` treats a child process (Orthanc, Prefect, ...) that exits."""

    # First restart after this long, doubling with each exit in a row, up to the maximum.
    restart_backoff_seconds: float = Field(2.0, gt=0)
    max_backoff_seconds: float = Field(120.0, gt=0)
    # Exits in a row after which the child is left stopped and shown failed in `radloop status`.
    restart_limit: int = Field(5, ge=0)
    # A child up this long after a restart is healthy again: its count of exits starts over.
    stable_seconds: float = Field(60.0, gt=0)


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    # production: placeholder secrets (PLACEHOLDER_SECRETS) stop start-up instead of a warning.
    environment: Environment = Environment.DEVELOPMENT
    data_dir: Path = Path.home() / ".local" / "share" / "radloop"
    # What every host of a cluster shares (spool, drafts, datasets, model repository, Prefect
    # task storage; e.g. NFS). Unset: `data_dir`. Logs and run state stay in `data_dir`.
    shared_dir: Path | None = None
    # Unset: SQLite (WAL) at `<data_dir>/radloop.db`.
    database_url: str | None = None
    # Unset: the specs shipped in `configs/models/`.
    models_dir: Path | None = None
    log_level: str = "INFO"
    # `radloop up` (`make run`) on a data dir without studies first runs `radloop demo`.
    demo_on_first_run: bool = True
    dicom: DicomSettings = DicomSettings()
    orthanc: OrthancSettings = OrthancSettings()
    watch: WatchSettings = WatchSettings()
    prefect: PrefectSettings = PrefectSettings()
    triton: TritonSettings = TritonSettings()
    annotation: AnnotationSettings = AnnotationSettings()
    outbox: OutboxSettings = OutboxSettings()
    review: ReviewSettings = ReviewSettings()
    mlflow: MlflowSettings = MlflowSettings()
    retrain: RetrainSettings = RetrainSettings()
    supervisor: SupervisorSettings = SupervisorSettings()
    object_store: ObjectStoreSettings = ObjectStoreSettings()

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return value.upper()

    @model_validator(mode="after")
    def _one_model_repository(self) -> Settings:
        if self.object_store.url and self.triton.repository:
            raise ValueError(
                "triton.repository and object_store.url both say where the model repository "
                "is: unset one (with an object store it is <url>/model-repository)"
            )
        return self

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> Settings:
        found = []
        if self.orthanc.password and self.orthanc.password.get_secret_value() in (
            PLACEHOLDER_SECRETS
        ):
            found.append("RADLOOP_ORTHANC__PASSWORD")
        if self.database_url and make_url(self.database_url).password in PLACEHOLDER_SECRETS:
            found.append("RADLOOP_DATABASE_URL")
        secret = self.object_store.secret_access_key
        if secret and secret.get_secret_value() in PLACEHOLDER_SECRETS:
            found.append("RADLOOP_OBJECT_STORE__SECRET_ACCESS_KEY")
        if found and self.environment is Environment.PRODUCTION:
            raise ValueError(
                f"{' and '.join(found)} still hold an example password; set real secrets "
                "(RADLOOP_ENVIRONMENT=production refuses placeholders)"
            )
        for key in found:
            log.warning("%s holds an example password: fine for development only", key)
        return self

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'radloop.db'}"

    @property
    def effective_models_dir(self) -> Path:
        return self.models_dir or PACKAGED_CONFIG.parent / "models"

    @property
    def effective_shared_dir(self) -> Path:
        return self.shared_dir or self.data_dir

    @property
    def model_repository(self) -> Path:
        return self.triton.repository or self.effective_shared_dir / "model-repository"

    def shared_store(self, key: str) -> ObjectStore:
        """`model-repository`, `datasets` (validated labels as image/label NIfTI pairs, per
        model and split): on the object store when one is set, else folders of the shared dir
        (the model repository at `triton.repository` when that is set)."""
        if self.object_store.url:
            return self.object_store.store(key)
        if key == "model-repository":
            return LocalFolder(self.model_repository)
        return LocalFolder(self.effective_shared_dir / key)

    @property
    def triton_repository_location(self) -> str:
        """`--model-repository` of a Triton this machine starts."""
        if self.object_store.url:
            url = self.object_store.url_of("model-repository")
            return triton_location(url, self.object_store.endpoint_url)
        return str(self.model_repository)

    @property
    def prefect_results_dir(self) -> Path:  # background tasks' parameters and results
        return self.effective_shared_dir / "prefect-results"

    @property
    def ohif_dir(self) -> Path:
        return self.review.ohif_dir or PROJECT_ROOT / ".cache" / f"ohif-{OHIF_VERSION}" / "dist"

    @property
    def ohif_ai_dir(self) -> Path:
        wheel = PROJECT_ROOT / ".cache" / f"monailabel-{MONAILABEL_VERSION}" / "ohif-build"
        return self.review.ohif_ai_dir or wheel / "monailabel" / "endpoints" / "static" / "ohif"

    @property
    def drafts_dir(self) -> Path:
        return self.effective_shared_dir / "drafts"

    @property
    def spool_dir(self) -> Path:
        return self.effective_shared_dir / "spool"

    @property
    def watch_folder(self) -> Path:
        return self.watch.folder or self.data_dir / "incoming"

    @property
    def rejected_folder(self) -> Path:
        return self.watch.rejected_folder or self.data_dir / "rejected"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = Path(os.environ.get(f"{ENV_PREFIX}CONFIG", PACKAGED_CONFIG))
        return (
            init_settings,
            env_settings,
            YamlConfigSettingsSource(settings_cls, yaml_file=config_file),
        )


def load_settings(**overrides: Any) -> Settings:
    """Build and validate settings; raise `SettingsError` naming each wrong key."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(describe_errors(error)) from None
