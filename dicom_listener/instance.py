"""What radloop reads from an instance before it trusts it: UIDs, SOP class, a sane payload."""

from __future__ import annotations

from dataclasses import dataclass

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
            value = ds.get(keyword)
            if value is None or str(value) == "":
                raise InvalidInstance(f"{keyword} is missing")
            if not is_valid_uid(str(value)):
                raise InvalidInstance(f"{keyword} is not a valid UID (digits and dots, <= 64)")
            uids[keyword] = str(value)
        if not is_valid_uid(transfer_syntax_uid):
            raise InvalidInstance("transfer syntax UID is not a valid UID")
        _check_native_pixel_data(ds, transfer_syntax_uid)
        frame_of_reference = ds.get("FrameOfReferenceUID")
        series_number = ds.get("SeriesNumber")
        return cls(
            study_uid=uids["StudyInstanceUID"],
            series_uid=uids["SeriesInstanceUID"],
            sop_instance_uid=uids["SOPInstanceUID"],
            sop_class_uid=uids["SOPClassUID"],
            transfer_syntax_uid=transfer_syntax_uid,
            modality=_text(ds.get("Modality"), 16),
            series_number=int(series_number) if series_number not in (None, "") else None,
            series_description=_text(ds.get("SeriesDescription"), 64),
            study_date=_text(ds.get("StudyDate"), 8),
            frame_of_reference_uid=str(frame_of_reference)
            if is_valid_uid(str(frame_of_reference))
            else None,
        )


def _text(value: object, limit: int) -> str | None:
    return None if value in (None, "") else str(value)[:limit]


_ENCAPSULATED_PREFIXES = ("1.2.840.10008.1.2.4.", "1.2.840.10008.1.2.5")


def _check_native_pixel_data(ds: Dataset, transfer_syntax_uid: str) -> None:
    """A truncated transfer leaves uncompressed pixel data short of what the header declares."""
    if "PixelData" not in ds or transfer_syntax_uid.startswith(_ENCAPSULATED_PREFIXES):
        return
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        # The raw element's length: no conversion (and copy) of megabytes of pixels.
        actual = len(ds.get_item("PixelData").value or b"")
    except (AttributeError, TypeError, ValueError) as error:
        raise InvalidInstance(
            f"image pixel attributes unreadable: {type(error).__name__}"
        ) from None
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if actual < expected:
        raise InvalidInstance(f"pixel data truncated: {actual} of {expected} bytes", True)
