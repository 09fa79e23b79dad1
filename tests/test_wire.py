"""The SCP's hand-written byte layouts (`dicom_listener.wire`) against the libraries' own
encodings of the same thing: pynetdicom's DIMSE messages and pydicom's file meta writer."""

from __future__ import annotations

import contextlib
from io import BytesIO

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.uid import UID
from pynetdicom.dimse_messages import C_ECHO_RQ, C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.pdu import P_DATA_TF

from dicom_listener import wire

uids = st.from_regex(r"\A[1-9][0-9]{0,8}(\.(0|[1-9][0-9]{0,8})){1,6}\Z")
statuses = st.sampled_from([0x0000, 0xA700, 0xA900, 0xC210, 0xB000])
message_ids = st.integers(0, 0xFFFF)


def _pynetdicom_pdus(message: object, context_id: int, max_pdu: int) -> list[bytes]:
    out = []
    for primitive in message.encode_msg(context_id, max_pdu):  # type: ignore[attr-defined]
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out.append(bytes(pdu.encode()))
    return out


@given(message_ids, statuses, uids, uids, st.integers(1, 127))
def test_store_response_is_pynetdicoms_byte_for_byte(
    message_id: int, status: int, sop_class: str, sop_instance: str, context_id: int
) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    ours = wire.response(wire.C_STORE_RSP, message_id, status, sop_class, sop_instance)
    assert wire.command_pdus(context_id, ours, 16384) == _pynetdicom_pdus(
        message, context_id, 16384
    )


@given(message_ids, uids)
def test_echo_response_is_pynetdicoms_byte_for_byte(message_id: int, sop_class: str) -> None:
    primitive = C_ECHO()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.Status = 0
    message = C_ECHO_RSP()
    message.primitive_to_message(primitive)
    ours = wire.response(wire.C_ECHO_RSP, message_id, 0, sop_class)
    assert wire.command_pdus(1, ours, 16384) == _pynetdicom_pdus(message, 1, 16384)


def test_a_response_is_split_to_the_peers_maximum_pdu_length() -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    primitive.Status = 0
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    ours = wire.response(wire.C_STORE_RSP, 7, 0, primitive.AffectedSOPClassUID, "1.2.3.4.5.6.7.8.9")
    assert wire.command_pdus(3, ours, 40) == _pynetdicom_pdus(message, 3, 40)
    assert len(wire.command_pdus(3, ours, 40)) > 1


def test_an_invalid_uid_from_the_request_is_left_out_of_the_response() -> None:
    answer = wire.response(wire.C_STORE_RSP, 1, 0xA900, "1.2.840.10008.5.1.4.1.1.2", "../../etc")
    assert b"../" not in answer
    assert b"1.2.840.10008.5.1.4.1.1.2" in answer


@given(
    uids,
    uids,
    st.sampled_from(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90"]),
)
def test_part10_header_is_pydicoms_byte_for_byte(
    sop_class: str, sop_instance: str, transfer_syntax: str
) -> None:
    meta = create_file_meta(
        sop_class_uid=UID(sop_class),
        sop_instance_uid=UID(sop_instance),
        transfer_syntax=UID(transfer_syntax),
    )
    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    assert wire.part10_header(sop_class, sop_instance, transfer_syntax) == expected


def _encoded_command(message: object) -> bytes:
    """The command set of a request pynetdicom encodes: the first P-DATA's one PDV."""
    first = next(iter(message.encode_msg(1, 0)))  # type: ignore[attr-defined]
    [(_, fragment)] = first.presentation_data_value_list
    assert fragment[0] & 0x03 == 0x03  # a command, whole
    return bytes(fragment[1:])


@given(message_ids, uids, uids)
def test_a_store_request_reads_as_pynetdicom_wrote_it(
    message_id: int, sop_class: str, sop_instance: str
) -> None:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Priority = 0
    primitive.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    command = wire.parse_command(_encoded_command(message))
    assert command == wire.Command(0x0001, message_id, sop_class, sop_instance, True)


def test_an_echo_request_has_no_dataset() -> None:
    primitive = C_ECHO()
    primitive.MessageID = 3
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    command = wire.parse_command(_encoded_command(message))
    assert (command.field, command.message_id, command.has_dataset) == (0x0030, 3, False)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00",  # shorter than an element header
        b"\x00\x00\x00\x01\xff\xff\x00\x00",  # a length past the end
        b"\x08\x00\x16\x00\x00\x00\x00\x00",  # group 0008 in a command set
        b"\x00\x00\x00\x01\x04\x00\x00\x00\x01\x00\x00\x00",  # CommandField of 4 bytes
    ],
)
def test_a_malformed_command_set_is_refused(data: bytes) -> None:
    with pytest.raises(wire.Malformed):
        wire.parse_command(data)


@given(st.binary(max_size=200))
def test_any_bytes_give_a_command_or_bad_command(data: bytes) -> None:
    with contextlib.suppress(wire.Malformed):
        wire.parse_command(data)


def test_pdv_items_are_read_in_order_with_their_flags() -> None:
    body = bytearray(b"\x00\x00\x00\x05\x01\x03abc" + b"\x00\x00\x00\x04\x03\x00de")
    items = [
        (cx, command, last, bytes(fragment)) for cx, command, last, fragment in wire.pdvs(body)
    ]
    assert items == [(1, True, True, b"abc"), (3, False, False, b"de")]


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x00",  # shorter than an item header
        b"\x00\x00\x00\x01\x01\x03",  # a length below the two header bytes
        b"\x00\x00\x00\x09\x01\x03abc",  # a length past the PDU
    ],
)
def test_a_pdv_item_that_does_not_fit_its_pdu_is_malformed(body: bytes) -> None:
    with pytest.raises(wire.Malformed):
        wire.pdvs(bytearray(body))
