"""radloop's DICOM upper layer (`dicom_listener.upper_layer`) against callers that break the
protocol, and against too many callers: each gets a specific answer (A-ASSOCIATE-RJ, A-ABORT,
or the connection closed) and the listener goes on taking studies from everyone else.

The server is the product's own (`build_server`), run in the test process on an ephemeral port
so a test can open raw sockets to it; `test_scp.py` covers the same code in `radloop listen`.
"""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from dicom_listener import Ingestor, StoreServer, build_server
from radloop.db import Store
from radloop.dicom_settings import DicomSettings
from radloop.settings import Settings
from tests.dicom_files import generated_ct
from tests.servers import free_port

ECHOSCU, STORESCU = "/usr/bin/echoscu", "/usr/bin/storescu"


@pytest.fixture
def scp(store: Store, settings: Settings) -> Iterator[StoreServer]:
    dicom = DicomSettings(port=free_port(), max_associations=2)
    server = build_server(dicom, Ingestor(store, settings.spool_dir))
    server.serve_in_background()
    yield server
    server.stop()


def _port(server: StoreServer) -> int:
    return int(server.server_address[1])


def _echo(server: StoreServer) -> bool:
    argv = [ECHOSCU, "-aec", "RADLOOP", "127.0.0.1", str(_port(server))]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0


def _answer(server: StoreServer, data: bytes) -> bytes:
    """Send `data` on a fresh connection, half-close it, and read what comes back."""
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00"  # A-ABORT, from the service provider


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ABORT),  # not DICOM at all
        (b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x02\x01\x03", ABORT),  # P-DATA first
        (b"\x01\x00\xff\xff\xff\xff", ABORT),  # an A-ASSOCIATE-RQ of 4 GiB
        (b"\x01\x00\x00\x00\x00\xc8" + b"\x00" * 10, b""),  # cut short: closed, no answer
        (b"\x01\x00\x00\x00\x00\x10" + b"\x00" * 16, ABORT),  # undecodable A-ASSOCIATE-RQ
    ],
    ids=["http", "p-data-first", "4-gib", "truncated", "undecodable"],
)
def test_a_caller_breaking_the_protocol_is_aborted_and_the_listener_goes_on(
    scp: StoreServer, data: bytes, expected: bytes
) -> None:
    assert _answer(scp, data) == expected
    assert _echo(scp)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(min_size=1, max_size=300))
def test_any_bytes_after_a_good_association_end_it_and_nothing_else(
    scp: StoreServer, garbage: bytes
) -> None:
    ae = AE(ae_title="FUZZ")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", _port(scp), ae_title="RADLOOP")
    assert assoc.is_established
    # A P-DATA-TF PDU with whatever bytes as its items.
    assoc.dul.socket.send(struct.pack(">BxL", 0x04, len(garbage)) + garbage)  # type: ignore[union-attr]
    assoc.abort()
    assert _echo(scp)


def test_callers_past_the_limit_are_refused_as_transient_and_taken_once_a_place_frees(
    scp: StoreServer, tmp_path: Path
) -> None:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    held = [ae.associate("127.0.0.1", _port(scp), ae_title="RADLOOP") for _ in range(2)]
    assert all(assoc.is_established for assoc in held)
    refused = ae.associate("127.0.0.1", _port(scp), ae_title="RADLOOP")
    assert refused.is_rejected
    # A-ASSOCIATE-RJ: rejected-transient, service-provider (presentation), local limit exceeded.
    rejection = refused.acceptor.primitive
    assert rejection is not None
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
    held[0].release()
    files = generated_ct(tmp_path / "ct", 2)
    argv = [STORESCU, "-aec", "RADLOOP", "127.0.0.1", str(_port(scp)), *map(str, files)]
    assert subprocess.run(argv, capture_output=True, timeout=60).returncode == 0
    held[1].release()
