"""The DICOM upper layer of radloop's SCP: one thread per association, blocking sockets.

Why not pynetdicom's `AE.start_server`, which radloop used until issue 14: each pynetdicom
association runs two polling threads that pass every PDU through queues and sleep 1 ms whenever
a queue is empty. A C-STORE of one 512×512 CT slice cost 6.3 ms in pynetdicom alone (159/s
with a handler that returned at once) — more than Orthanc needs to receive, fsync and index
the same instance (docs/benchmarks.md, "Ingest faster than Orthanc").

pynetdicom still does every part of association negotiation: it decodes the A-ASSOCIATE-RQ,
negotiates presentation contexts and SCP/SCU roles, and encodes the A-ASSOCIATE-AC/RJ,
A-RELEASE-RP and A-ABORT. What is written here is the loop that reads PDUs (PS3.8 9.3) and
joins P-DATA fragments into messages (PS3.7 E and PS3.8 9.3.5), the order of the acceptor's
checks, which follows pynetdicom's, and (in `wire`) the fixed layouts of the command sets read
and written for every instance.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import (
    A_ABORT_RQ,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
)
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor

from dicom_listener.wire import (
    C_ECHO_RSP,
    C_STORE_RSP,
    Command,
    Malformed,
    command_pdus,
    parse_command,
    pdvs,
    response,
)

log = logging.getLogger(__name__)


class PeerGone(Exception):
    """The connection closed, timed out or broke the protocol; the association is over."""


APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, P_DATA, RELEASE_RQ, ABORT = 0x01, 0x04, 0x05, 0x07
# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
UNABLE_TO_PROCESS = 0xC211
# The largest PDU radloop accepts, and says so in the A-ASSOCIATE-AC: large enough that a
# CT slice takes a few PDUs, small enough that a length field cannot make it reserve gigabytes.
MAX_PDU = 4 * 1024 * 1024
# (result, source, diagnostic) of an A-ASSOCIATE-RJ (PS3.8 9.3.4)
REJECT_CONTEXT_NAME = (0x01, 0x01, 0x02)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_LIMIT = (0x02, 0x03, 0x02)

_PDU_HEADER = struct.Struct(">BxL")


def _abort_pdu() -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source, pdu.reason_diagnostic = 0x02, 0x00  # service provider, no reason given
    return bytes(pdu.encode())


_ABORT = _abort_pdu()


@dataclass
class Request:
    """One DIMSE request: its command set, and the dataset's bytes when it has one."""

    context: PresentationContext
    command: Command
    data: bytes | None


@dataclass
class Acceptor:
    """What the SCP accepts and who it answers; the handlers run in the association's thread.

    `allows(calling_ae, address)` decides who may associate; `on_store(request)` returns the
    C-STORE status.
    """

    ae_title: str
    contexts: Sequence[PresentationContext]
    allows: Callable[[str, str], bool]
    on_store: Callable[[Request], int]
    max_associations: int
    timeout: float = 60.0


def supported_contexts(
    storage: Sequence[str], transfer_syntaxes: Sequence[str], verification: str
) -> list[PresentationContext]:
    contexts = [build_context(verification)]
    contexts += [build_context(sop, list(transfer_syntaxes)) for sop in storage]
    return contexts


class StoreServer(socketserver.ThreadingTCPServer):
    """Accepts associations on one port, each in its own thread, until `shutdown`."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        acceptor: Acceptor,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.acceptor = acceptor
        self.ssl_context = ssl_context
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        super().__init__(address, _Handler)

    def serve_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="dicom-accept", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Stop accepting and end the associations in progress (their sockets are shut down)."""
        self.shutdown()
        self.server_close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _opened(self, sock: socket.socket) -> int:
        with self._lock:
            self._open.add(sock)
            return len(self._open)

    def _closed(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)


class _Handler(socketserver.BaseRequestHandler):
    server: StoreServer

    def handle(self) -> None:
        server, sock = self.server, self.request
        sock.settimeout(server.acceptor.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if server.ssl_context is not None:
            try:
                sock = server.ssl_context.wrap_socket(sock, server_side=True)
            except (OSError, ssl.SSLError) as error:
                log.warning("TLS handshake with %s failed: %s", self.client_address[0], error)
                return
        count = server._opened(sock)
        try:
            Association(sock, str(self.client_address[0]), server.acceptor, count).run()
        except PeerGone as reason:
            log.debug("association from %s ended: %s", self.client_address[0], reason)
        except (OSError, ssl.SSLError) as error:
            log.info("association from %s broke: %s", self.client_address[0], error)
        except Exception as error:
            # pynetdicom refusing a malformed A-ASSOCIATE-RQ, say. Its text may quote what the
            # peer sent: the type only. The peer gets an A-ABORT, other associations go on.
            log.warning(
                "association from %s aborted: %s", self.client_address[0], type(error).__name__
            )
            with contextlib.suppress(OSError):
                sock.sendall(_ABORT)
        finally:
            server._closed(sock)
            _close_gracefully(sock)


@dataclass
class Association:
    sock: socket.socket
    address: str
    acceptor: Acceptor
    open_associations: int
    contexts: dict[int, PresentationContext] = field(default_factory=dict)
    peer_max_pdu: int = 0

    def run(self) -> None:
        kind, body = self._read_pdu()
        if kind != ASSOCIATE_RQ:
            self._abort()
            raise PeerGone(f"expected A-ASSOCIATE-RQ, got PDU type {kind:#04x}")
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(_PDU_HEADER.pack(kind, len(body)) + body)
        request = pdu.to_primitive()
        if not self._accept(request):
            return
        self._serve()

    def _accept(self, request: A_ASSOCIATE) -> bool:
        """Reject (A-ASSOCIATE-RJ) or accept the association. A caller no rule allows is
        refused first, as radloop's EVT_REQUESTED handler did under pynetdicom; then
        pynetdicom's own checks, where the last one that fails gives the reason."""
        calling = str(request.calling_ae_title).strip()
        reject: tuple[int, int, int] | None = None
        if not self.acceptor.allows(calling, self.address):
            log.warning(
                "rejected association from AE %r at %s: not an allowed caller",
                calling,
                self.address,
            )
            reject = REJECT_CALLING_AE
        else:
            if str(request.application_context_name) != APPLICATION_CONTEXT:
                reject = REJECT_CONTEXT_NAME
            if str(request.called_ae_title).strip() != self.acceptor.ae_title:
                reject = REJECT_CALLED_AE
            if self.open_associations > self.acceptor.max_associations:
                reject = REJECT_LIMIT
        if reject is not None:
            refusal = A_ASSOCIATE()
            refusal.result, refusal.result_source, refusal.diagnostic = reject
            self.sock.sendall(_encode(A_ASSOCIATE_RJ(), refusal))
            return False

        roles: dict[UID, tuple[bool | None, bool | None]] = {}
        for item in request.user_information:
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
                roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
            elif isinstance(item, MaximumLengthNotification):
                self.peer_max_pdu = int(item.maximum_length_received or 0)
        results, reply_roles = negotiate_as_acceptor(
            request.presentation_context_definition_list, list(self.acceptor.contexts), roles
        )
        self.contexts = {cx.context_id: cx for cx in results if cx.result == 0 and cx.context_id}

        accept = A_ASSOCIATE()
        accept.application_context_name = APPLICATION_CONTEXT
        accept.calling_ae_title = request.calling_ae_title
        accept.called_ae_title = request.called_ae_title
        accept.result, accept.result_source = 0x00, 0x01
        accept.presentation_context_definition_results_list = results
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = MAX_PDU
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        accept.user_information = [maximum, implementation, version, *reply_roles]
        self.sock.sendall(_encode(A_ASSOCIATE_AC(), accept))
        return True

    def _serve(self) -> None:
        """Answer DIMSE requests until the peer releases or aborts."""
        command: list[memoryview] = []
        data: list[memoryview] = []
        pending: tuple[int, Command] | None = None  # a command waiting for its dataset
        while True:
            kind, body = self._read_pdu()
            if kind == RELEASE_RQ:
                self.sock.sendall(A_RELEASE_RP().encode())
                return
            if kind == ABORT:
                raise PeerGone("A-ABORT from the peer")
            if kind != P_DATA:
                self._abort()
                raise PeerGone(f"unexpected PDU type {kind:#04x}")
            try:
                items = pdvs(body)
            except Malformed as error:
                self._abort()
                raise PeerGone(f"malformed P-DATA-TF: {error}") from None
            for context_id, is_command, last, fragment in items:
                if context_id not in self.contexts:
                    self._abort()
                    raise PeerGone(f"PDV on presentation context {context_id}, not accepted")
                if is_command:
                    if pending is not None:
                        self._abort()
                        raise PeerGone("a command arrived before the previous one's dataset")
                    command.append(fragment)
                    if not last:
                        continue
                    try:
                        parsed = parse_command(b"".join(command))
                    except Malformed as error:
                        self._abort()
                        raise PeerGone(f"undecodable command set: {error}") from None
                    command.clear()
                    if parsed.has_dataset:
                        pending = (context_id, parsed)
                    else:
                        self._answer(Request(self.contexts[context_id], parsed, None))
                    continue
                if pending is None or pending[0] != context_id:
                    self._abort()
                    raise PeerGone("a dataset fragment without its command")
                data.append(fragment)
                if last:
                    joined = b"".join(data)
                    data.clear()
                    self._answer(Request(self.contexts[context_id], pending[1], joined))
                    pending = None

    def _answer(self, request: Request) -> None:
        command = request.command
        if command.field == C_STORE_RQ and request.data is not None:
            try:
                status = self.acceptor.on_store(request)
            except Exception as error:
                # A fault of radloop's, not the sender's: answer as pynetdicom does then.
                log.error("C-STORE handler failed: %s", type(error).__name__)
                status = UNABLE_TO_PROCESS
            field_ = C_STORE_RSP
        elif command.field == C_ECHO_RQ:
            status, field_ = 0x0000, C_ECHO_RSP
        else:
            # Only storage and verification contexts are ever accepted: anything else is a
            # peer that does not follow what it negotiated.
            self._abort()
            raise PeerGone(f"unsupported DIMSE command {command.field:#06x}")
        answer = response(
            field_, command.message_id, status, command.sop_class_uid, command.sop_instance_uid
        )
        context_id = int(request.context.context_id)  # type: ignore[arg-type]
        self.sock.sendall(b"".join(command_pdus(context_id, answer, self.peer_max_pdu or MAX_PDU)))

    def _read_pdu(self) -> tuple[int, bytearray]:
        kind, length = _PDU_HEADER.unpack(self._read_exactly(6))
        if length > MAX_PDU:
            self._abort()
            raise PeerGone(f"PDU of {length} bytes, over the {MAX_PDU} radloop accepts")
        return kind, self._read_exactly(length)

    def _read_exactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        while got < size:
            try:
                n = self.sock.recv_into(view[got:], size - got)
            except TimeoutError:
                self._abort()
                raise PeerGone(f"no data for {self.acceptor.timeout:g} s") from None
            if n == 0:
                raise PeerGone("connection closed")
            got += n
        return buffer

    def _abort(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(_ABORT)


def _close_gracefully(sock: socket.socket) -> None:
    """Close after the peer has read what was sent last (an A-ABORT, an A-ASSOCIATE-RJ): send
    FIN, then read what it still sends, up to a second, so the close does not answer unread
    input with a TCP reset that can destroy the reply before the peer reads it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(1.0)
        for _ in range(64):
            if not sock.recv(65536):
                break
    with contextlib.suppress(OSError):
        sock.close()


def _encode(pdu: Any, primitive: Any) -> bytes:
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())
