"""The C-STORE/C-ECHO SCP a PACS pushes to.

Handlers are plain functions bound once in `build_ae`; the association thread only decodes,
writes, indexes and answers — completion runs elsewhere (`assembly`).
"""

from __future__ import annotations

import logging
from io import BytesIO
from typing import Any, cast

from pydicom import uid as dicom_uid
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRColorImageStorage,
    EnhancedMRImageStorage,
    EnhancedPETImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    LegacyConvertedEnhancedPETImageStorage,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    SegmentationStorage,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from sqlalchemy.exc import SQLAlchemyError

from dicom_listener.ingest import Ingestor
from dicom_listener.instance import InstanceHeader, InvalidInstance
from radloop.callers import CallerRule
from radloop.dicom_settings import DicomSettings
from radloop.domain import IngestSource, is_valid_uid

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES = (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    EnhancedMRColorImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    PositronEmissionTomographyImageStorage,
    EnhancedPETImageStorage,
    LegacyConvertedEnhancedPETImageStorage,
    SegmentationStorage,
)

# Uncompressed first; compressed syntaxes are accepted and stored exactly as received.
TRANSFER_SYNTAXES = [
    dicom_uid.ExplicitVRLittleEndian,
    dicom_uid.ImplicitVRLittleEndian,
    dicom_uid.DeflatedExplicitVRLittleEndian,
    dicom_uid.ExplicitVRBigEndian,
    dicom_uid.JPEGBaseline8Bit,
    dicom_uid.JPEGExtended12Bit,
    dicom_uid.JPEGLossless,
    dicom_uid.JPEGLosslessSV1,
    dicom_uid.JPEGLSLossless,
    dicom_uid.JPEGLSNearLossless,
    dicom_uid.JPEG2000Lossless,
    dicom_uid.JPEG2000,
    dicom_uid.HTJ2KLossless,
    dicom_uid.HTJ2KLosslessRPCL,
    dicom_uid.HTJ2K,
    dicom_uid.RLELossless,
]

VERIFICATION = "1.2.840.10008.1.1"
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210

# A-ASSOCIATE-RJ: rejected-permanent, service-user, calling AE title not recognised.
_REJECT_CALLER = (0x01, 0x01, 0x03)


def handle_echo(event: Event) -> int:
    return SUCCESS


def handle_association_request(event: Event, callers: list[CallerRule]) -> None:
    """Refuse callers whose AE title and address match no configured rule."""
    request = event.assoc.requestor.primitive
    calling = str(request.calling_ae_title).strip() if request is not None else ""
    address = str(event.assoc.requestor.address)
    if any(rule.allows(calling, address) for rule in callers):
        return
    log.warning("rejected association from AE %r at %s: not an allowed caller", calling, address)
    event.assoc.acse.send_reject(*_REJECT_CALLER)
    # As pynetdicom's own rejection does: let the DUL flush the A-ASSOCIATE-RJ before the
    # server closes the socket, so the caller sees the reason rather than an abort.
    event.assoc.kill()


def handle_store(event: Event, ingestor: Ingestor) -> int:
    """Store one instance; Success only once it is durable on disk and indexed."""
    request = cast(C_STORE, event.request)
    affected = str(request.AffectedSOPInstanceUID)
    try:
        dataset = event.dataset
        transfer_syntax = str(event.context.transfer_syntax)
        header = InstanceHeader.from_dataset(dataset, transfer_syntax)
    except InvalidInstance as error:
        log.warning("refused instance %s: %s", _loggable(affected), error)
        return CANNOT_UNDERSTAND if error.undecodable else DOES_NOT_MATCH_SOP_CLASS
    except Exception as error:
        # The exception text may quote element values: log its type only.
        log.warning(
            "refused instance %s: cannot decode (%s)", _loggable(affected), type(error).__name__
        )
        return CANNOT_UNDERSTAND
    if header.sop_instance_uid != affected:
        log.warning(
            "refused instance %s: SOP Instance UID differs from the request", _loggable(affected)
        )
        return DOES_NOT_MATCH_SOP_CLASS
    if header.sop_class_uid != str(request.AffectedSOPClassUID):
        log.warning(
            "refused instance %s: SOP Class UID differs from the request", _loggable(affected)
        )
        return DOES_NOT_MATCH_SOP_CLASS
    try:
        ingestor.ingest(header, _part10_chunks(event, request), IngestSource.DIMSE)
    except (OSError, SQLAlchemyError) as error:
        log.error("could not store instance %s: %s", affected, error)
        return OUT_OF_RESOURCES
    return SUCCESS


def _part10_chunks(event: Event, request: C_STORE) -> list[bytes | memoryview]:
    """The instance as a DICOM file, as `event.encoded_dataset()` gives it, but in two chunks
    so the received dataset (often megabytes) is not copied to be joined to its header."""
    header = b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta)
    return [header, cast(BytesIO, request.DataSet).getbuffer()]


def _loggable(value: str) -> str:
    """UIDs are safe to log as they are; anything else (e.g. a path-traversal attempt) is
    shown escaped and cut short."""
    return value if is_valid_uid(value) else ascii(value[:64])


def build_ae(settings: DicomSettings, ingestor: Ingestor) -> tuple[AE, list[Any]]:
    """The application entity and its handler bindings, ready for `start_server`."""
    ae = AE(ae_title=settings.ae_title)
    ae.require_called_aet = True
    ae.maximum_associations = settings.max_associations
    # Let the sender use large PDUs: fewer round trips per instance.
    ae.maximum_pdu_size = 0
    ae.add_supported_context(VERIFICATION)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    handlers = [
        (evt.EVT_REQUESTED, handle_association_request, [settings.allowed_callers]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ingestor]),
    ]
    return ae, handlers
