"""The C-STORE/C-ECHO SCP a PACS pushes to.

`build_server` binds the store handler to the upper layer (`upper_layer`); the association
thread only decodes, writes, indexes and answers — completion runs elsewhere (`assembly`).
"""

from __future__ import annotations

import logging
import ssl
from io import BytesIO

from pydicom import uid as dicom_uid
from pydicom.uid import (
    UID,
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
from pynetdicom.dsutils import decode
from sqlalchemy.exc import SQLAlchemyError

from dicom_listener.ingest import Ingestor
from dicom_listener.instance import InstanceHeader, InvalidInstance
from dicom_listener.upper_layer import Acceptor, Request, StoreServer, supported_contexts
from dicom_listener.wire import part10_header
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

_DEFLATED = str(dicom_uid.DeflatedExplicitVRLittleEndian)


def handle_store(request: Request, ingestor: Ingestor) -> int:
    """Store one instance; Success only once it is durable on disk and indexed."""
    affected = request.command.sop_instance_uid
    transfer_syntax = str(request.context.transfer_syntax[0])
    data = request.data or b""
    try:
        syntax = UID(transfer_syntax)
        dataset = decode(
            BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian, syntax == _DEFLATED
        )
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
    if header.sop_class_uid != request.command.sop_class_uid:
        log.warning(
            "refused instance %s: SOP Class UID differs from the request", _loggable(affected)
        )
        return DOES_NOT_MATCH_SOP_CLASS
    # The Part 10 file in two chunks, so the received dataset (often megabytes) is not copied
    # to be joined to its header.
    meta = part10_header(header.sop_class_uid, header.sop_instance_uid, transfer_syntax)
    chunks = [meta, data]
    try:
        ingestor.ingest(header, chunks, IngestSource.DIMSE)
    except (OSError, SQLAlchemyError) as error:
        log.error("could not store instance %s: %s", affected, error)
        return OUT_OF_RESOURCES
    return SUCCESS


def _loggable(value: str) -> str:
    """UIDs are safe to log as they are; anything else (e.g. a path-traversal attempt) is
    shown escaped and cut short."""
    return value if is_valid_uid(value) else ascii(value[:64])


def build_server(settings: DicomSettings, ingestor: Ingestor) -> StoreServer:
    """The SCP bound to `settings.host:port`, not yet serving (`serve_in_background`)."""
    acceptor = Acceptor(
        ae_title=settings.ae_title,
        contexts=supported_contexts(STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, VERIFICATION),
        allows=lambda calling, address: any(
            rule.allows(calling, address) for rule in settings.allowed_callers
        ),
        on_store=lambda request: handle_store(request, ingestor),
        max_associations=settings.max_associations,
    )
    context: ssl.SSLContext | None = settings.tls.server_context() if settings.tls else None
    return StoreServer((settings.host, settings.port), acceptor, context)
