"""Hostile variants of good files, for the fuzz tests (hypothesis) and harnesses (atheris).

Two kinds: byte mutations (flips, overwrites with boundary integers, cuts, insertions,
deletions; most land in the first kilobytes, where headers and tag lengths are) and, for DICOM,
element mutations (an attribute radloop reads set to raw bytes of any kind, or removed).
"""

from __future__ import annotations

import struct
from io import BytesIO

from hypothesis import assume
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

# Integers at the edges of what lengths, counts and dimensions hold.
BOUNDARY = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]
HEADER_BYTES = 4096

# What the decode, validate and volume paths read from an instance.
KEYWORDS = [
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "FrameOfReferenceUID",
    "Modality",
    "SeriesNumber",
    "InstanceNumber",
    "StudyDate",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "PixelSpacing",
    "SliceThickness",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "RescaleSlope",
    "RescaleIntercept",
    "PixelData",
]
ODD_VALUES = [
    b"",
    b"0",
    b"-1",
    b"65536",
    b"1e308",
    b"nan",
    b"inf",
    b"1\\2\\3",
    b"1.2.3.\x00",
    b"\x00\x00\x00\x00",
    b"\xff" * 8,
    b"MONOCHROME2",
    b"RGB ",
    b"1.2.840.10008.5.1.4.1.1.2",
]


@st.composite
def mutated_bytes(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        limit = len(data) if draw(st.integers(0, 4)) == 0 else min(len(data), HEADER_BYTES)
        at = draw(st.integers(0, limit - 1))
        kind = draw(st.sampled_from(["flip", "integer", "cut", "insert", "delete"]))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "integer":
            value = draw(st.sampled_from(BOUNDARY))
            width = draw(st.sampled_from(["<H", "<I", ">H", ">I"]))
            packed = struct.pack(width, value & (0xFFFF if width[1] == "H" else 0xFFFFFFFF))
            data[at : at + len(packed)] = packed
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            del data[at : at + draw(st.integers(1, 256))]
    return bytes(data)


@st.composite
def mutated_elements(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed DICOM file with some of `KEYWORDS` set to odd raw values or removed."""
    ds = dcmread(BytesIO(draw(st.sampled_from(seeds))))
    for keyword in draw(st.lists(st.sampled_from(KEYWORDS), min_size=1, max_size=4)):
        tag = Tag(keyword)
        if draw(st.booleans()) and tag in ds:
            del ds[tag]
            continue
        value = draw(st.one_of(st.sampled_from(ODD_VALUES), st.binary(max_size=24)))
        vr = dictionary_VR(tag).split(" ")[0]
        # Stored raw: pydicom writes the bytes as they are and decodes them only when read.
        ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    out = BytesIO()
    try:
        ds.save_as(out, enforce_file_format=False)
    except Exception:  # a value pydicom will not write: not an input anyone can send
        assume(False)
    return out.getvalue()


def dicom_inputs(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(mutated_bytes(seeds), mutated_elements(seeds))
