"""The few fixed byte layouts the SCP reads and writes for every instance: the PDV items of a
P-DATA-TF PDU (PS3.8 9.3.5.1), the request's command set, the C-STORE and C-ECHO responses
(PS3.7 9.3.1.2 and 9.3.5.2; command sets are Implicit VR Little Endian, PS3.7 6.3.1) in their
P-DATA-TF PDU, and the Part 10 file meta header (PS3.10 7.1).

pynetdicom and pydicom build the same bytes through their general Dataset machinery, which
cost more CPU per instance than the rest of the receive path together (profile in
docs/benchmarks.md, "Ingest faster than Orthanc"). `tests/test_wire.py` checks these against
pynetdicom's and pydicom's encodings, byte for byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from radloop.domain import is_valid_uid

C_STORE_RSP, C_ECHO_RSP = 0x8001, 0x8030
_NO_DATASET = 0x0101
_PREAMBLE = b"\x00" * 128 + b"DICM"


def _implicit(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def response(
    command_field: int,
    message_id: int,
    status: int,
    sop_class_uid: object,
    sop_instance_uid: object = None,
) -> bytes:
    """The command set of a C-STORE-RSP or C-ECHO-RSP. A UID from the request that is not a
    valid UID is left out, as pynetdicom's primitives leave it out."""
    elements = []
    if is_valid_uid(sop_class_uid):
        elements.append(_implicit(0x0002, _uid(str(sop_class_uid))))
    elements.append(_implicit(0x0100, struct.pack("<H", command_field)))
    elements.append(_implicit(0x0120, struct.pack("<H", message_id & 0xFFFF)))
    elements.append(_implicit(0x0800, struct.pack("<H", _NO_DATASET)))
    elements.append(_implicit(0x0900, struct.pack("<H", status)))
    if command_field == C_STORE_RSP and is_valid_uid(sop_instance_uid):
        elements.append(_implicit(0x1000, _uid(str(sop_instance_uid))))
    body = b"".join(elements)
    return _implicit(0x0000, struct.pack("<L", len(body))) + body


def command_pdus(context_id: int, command: bytes, max_pdu: int) -> list[bytes]:
    """`command` as P-DATA-TF PDUs of at most `max_pdu` bytes of PDV items each (the peer's
    Maximum Length Received), one command fragment per PDU."""
    size = max(max_pdu - 6, 1)
    fragments = [command[i : i + size] for i in range(0, len(command), size)] or [b""]
    pdus = []
    for index, fragment in enumerate(fragments):
        header = 0x03 if index == len(fragments) - 1 else 0x01  # command; last fragment
        item = struct.pack(">LBB", len(fragment) + 2, context_id, header) + fragment
        pdus.append(struct.pack(">BxL", 0x04, len(item)) + item)
    return pdus


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, "DICM" and the file meta group, as pydicom writes what pynetdicom's
    `create_file_meta` holds for a received instance."""
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    if len(version) % 2:
        version += b" "
    body = b"".join(
        (
            _explicit(0x0001, b"OB", b"\x00\x01"),
            _explicit(0x0002, b"UI", _uid(sop_class_uid)),
            _explicit(0x0003, b"UI", _uid(sop_instance_uid)),
            _explicit(0x0010, b"UI", _uid(transfer_syntax_uid)),
            _explicit(0x0012, b"UI", _uid(str(PYNETDICOM_IMPLEMENTATION_UID))),
            _explicit(0x0013, b"SH", version),
        )
    )
    return _PREAMBLE + _explicit(0x0000, b"UL", struct.pack("<L", len(body))) + body


class Malformed(ValueError):
    """Bytes that do not follow the layout they claim: a PDV item or a command set."""


def pdvs(body: bytearray) -> list[tuple[int, bool, bool, memoryview]]:
    """The presentation data values of a P-DATA-TF: (context, is command, is last, fragment)."""
    view, offset, out = memoryview(body), 0, []
    while offset < len(body):
        if offset + 6 > len(body):
            raise Malformed("truncated PDV item")
        length = int.from_bytes(body[offset : offset + 4], "big")
        if length < 2 or offset + 4 + length > len(body):
            raise Malformed("PDV item length does not fit its PDU")
        header = body[offset + 5]
        fragment = view[offset + 6 : offset + 4 + length]
        out.append((body[offset + 4], bool(header & 0x01), bool(header & 0x02), fragment))
        offset += 4 + length
    return out


@dataclass(frozen=True)
class Command:
    """What the SCP reads from a DIMSE request's command set."""

    field: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    has_dataset: bool


def parse_command(data: bytes) -> Command:
    """Read a request's command set (Implicit VR Little Endian, group 0000 only)."""
    values: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if offset + 8 > len(data):
            raise Malformed("truncated element header")
        group, element, length = struct.unpack_from("<HHL", data, offset)
        offset += 8
        if group != 0x0000 or offset + length > len(data):
            raise Malformed("element outside group 0000 or past the end")
        values[element] = data[offset : offset + length]
        offset += length

    def number(element: int, default: int) -> int:
        raw = values.get(element)
        if raw is None:
            return default
        if len(raw) != 2:
            raise Malformed(f"(0000,{element:04X}) is not a US value")
        return int.from_bytes(raw, "little")

    def text(element: int) -> str:
        return values.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace")

    return Command(
        field=number(0x0100, 0),
        message_id=number(0x0110, 0),
        sop_class_uid=text(0x0002),
        sop_instance_uid=text(0x1000),
        has_dataset=number(0x0800, _NO_DATASET) != _NO_DATASET,
    )
