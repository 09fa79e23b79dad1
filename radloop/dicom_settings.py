"""The DICOM sections of the settings tree (`radloop.settings`): the SCP's address, who may
call it, and its TLS."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import NoDecode

from radloop.callers import AE_TITLE, CallerRule


class Section(BaseModel):
    """A section of the settings tree: read once at start, never changed after."""

    model_config = ConfigDict(frozen=True)


class TlsSettings(Section):
    """DICOM TLS (PS3.15 B.1): the server's certificate and key; with `ca_file`, callers must
    present a certificate signed by that CA (mutual TLS)."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None

    @field_validator("cert_file", "key_file", "ca_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        if self.ca_file is not None:
            context.load_verify_locations(self.ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


class DicomSettings(Section):
    ae_title: str = "RADLOOP"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    # Comma-separated `AE[@host-or-network]`; `*` stands for any AE title.
    allowed_callers: Annotated[list[CallerRule], NoDecode] = Field(
        default_factory=lambda: [CallerRule.parse("*@127.0.0.1")]
    )
    quiet_seconds: float = Field(30.0, gt=0)
    max_associations: int = Field(16, ge=1)
    # Unset: plain TCP. Set cert_file and key_file (RADLOOP_DICOM__TLS__CERT_FILE, ...) for TLS.
    tls: TlsSettings | None = None

    @field_validator("ae_title")
    @classmethod
    def _valid_ae(cls, value: str) -> str:
        if not AE_TITLE.match(value) or not value.strip():
            raise ValueError("must be 1-16 printable characters without backslash")
        return value.strip()

    @field_validator("allowed_callers", mode="before")
    @classmethod
    def _parse_callers(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            return [CallerRule.parse(v) if isinstance(v, str) else v for v in value]
        return value
