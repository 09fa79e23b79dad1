"""What radloop reads from an instance before it trusts it: UIDs, SOP class, a sane payload."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from radloop.domain import is_valid_uid


class InvalidInstance(ValueError):
    """The dataset cannot be stored; the message says why (no patient data in it).

    `undecodable` separates bytes that are not a usable dataset at all (DICOM "cannot
    understand") from a dataset that decodes but lacks or misstates its identity.
    """

    def __init__(self, reason: str, undecodable: bool = False) -> None:
        super().__init__(reason)
        self.undecodable = undecodable


@dataclass(frozen=True)
class InstanceHeader:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    study_date: str | None = None
    frame_of_reference_uid: str | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset, transfer_syntax_uid: str) -> InstanceHeader:
        """Validate identity and payload; raise `InvalidInstance` naming the first problem."""
        if "SOPClassUID" not in ds and "SOPInstanceUID" not in ds:
            raise InvalidInstance("not a decodable dataset: no SOP Class/Instance UID", True)
        uids = {}
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            value = _get(ds, keyword)
            if value is None or str(value) == "":
                raise InvalidInstance(f"{keyword} is missing")
            if not is_valid_uid(str(value)):
                raise InvalidInstance(f"{keyword} is not a valid UID (digits and dots, <= 64)")
            uids[keyword] = str(value)
        if not is_valid_uid(transfer_syntax_uid):
            raise InvalidInstance("transfer syntax UID is not a valid UID")
        _check_native_pixel_data(ds, transfer_syntax_uid)
        frame_of_reference = _get(ds, "FrameOfReferenceUID")
        series_number = _get(ds, "SeriesNumber")
        try:
            number = int(series_number) if series_number not in (None, "") else None
        except (TypeError, ValueError, OverflowError):
            raise InvalidInstance("SeriesNumber is not an integer") from None
        return cls(
            study_uid=uids["StudyInstanceUID"],
            series_uid=uids["SeriesInstanceUID"],
            sop_instance_uid=uids["SOPInstanceUID"],
            sop_class_uid=uids["SOPClassUID"],
            transfer_syntax_uid=transfer_syntax_uid,
            modality=_text(_get(ds, "Modality"), 16),
            series_number=number,
            series_description=_text(_get(ds, "SeriesDescription"), 64),
            study_date=_text(_get(ds, "StudyDate"), 8),
            frame_of_reference_uid=str(frame_of_reference)
            if is_valid_uid(str(frame_of_reference))
            else None,
        )


def _get(ds: Dataset, keyword: str) -> Any:
    """`ds.get(keyword)`; a value pydicom cannot convert (a wrong length for its VR, bytes that
    are no number) is `InvalidInstance` naming the attribute, not pydicom's exception."""
    try:
        return ds.get(keyword)
    except Exception as error:
        raise InvalidInstance(
            f"{keyword} cannot be decoded ({type(error).__name__})", undecodable=True
        ) from None


def _text(value: object, limit: int) -> str | None:
    return None if value in (None, "") else str(value)[:limit]


_ENCAPSULATED_PREFIXES = ("1.2.840.10008.1.2.4.", "1.2.840.10008.1.2.5")


def _check_native_pixel_data(ds: Dataset, transfer_syntax_uid: str) -> None:
    """A truncated transfer leaves uncompressed pixel data short of what the header declares."""
    if "PixelData" not in ds or transfer_syntax_uid.startswith(_ENCAPSULATED_PREFIXES):
        return
    try:
        rows, columns = int(_get(ds, "Rows")), int(_get(ds, "Columns"))
        bits = int(_get(ds, "BitsAllocated"))
        samples = int(_get(ds, "SamplesPerPixel") or 1)
        frames = int(_get(ds, "NumberOfFrames") or 1)
        # The raw element's length: no conversion (and copy) of megabytes of pixels.
        actual = len(ds.get_item("PixelData").value or b"")
    except (AttributeError, TypeError, ValueError, OverflowError) as error:
        raise InvalidInstance(
            f"image pixel attributes unreadable: {type(error).__name__}"
        ) from None
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if actual < expected:
        raise InvalidInstance(f"pixel data truncated: {actual} of {expected} bytes", True)
