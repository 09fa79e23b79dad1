"""Who may send radloop studies: one rule per allowed DICOM caller, parsed from settings."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash


@dataclass(frozen=True)
class CallerRule:
    """One allowed caller: an AE title (``*`` for any) and optionally a host or network."""

    ae_title: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None

    @classmethod
    def parse(cls, text: str) -> CallerRule:
        ae, _, host = text.strip().partition("@")
        ae = ae.strip()
        if ae != "*" and not AE_TITLE.match(ae):
            raise ValueError(f"{ae!r} is not a valid AE title (1-16 characters, no backslash)")
        network = ipaddress.ip_network(host.strip(), strict=False) if host.strip() else None
        return cls(ae_title=ae, network=network)

    def allows(self, ae_title: str, address: str) -> bool:
        if self.ae_title != "*" and self.ae_title != ae_title.strip():
            return False
        if self.network is None:
            return True
        try:
            return ipaddress.ip_address(address) in self.network
        except ValueError:
            return False

    def __str__(self) -> str:
        return self.ae_title + (f"@{self.network}" if self.network else "")
