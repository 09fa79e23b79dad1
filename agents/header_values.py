"""Whether a DICOM header's values can be read as an image's: decoded, and numbers where the
volume loader (`agents.volume`) reads numbers."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

# The numbers the loader reads from a file's top level, with how many values each holds
# (negative: integers >= 0).
_NUMBERS = {
    "Rows": -1,
    "Columns": -1,
    "NumberOfFrames": -1,
    "SamplesPerPixel": -1,
    "BitsAllocated": -1,
    "BitsStored": -1,
    "HighBit": -1,
    "PixelRepresentation": -1,
    "PlanarConfiguration": -1,
    "PixelSpacing": 2,
    "ImagePositionPatient": 3,
    "ImageOrientationPatient": 6,
    "RescaleSlope": 1,
    "RescaleIntercept": 1,
}
_REQUIRED = ("Rows", "Columns", "BitsAllocated")


def header_problem(ds: Dataset) -> str | None:
    """What is wrong with `ds`'s top level for loading it as an image, or None.

    Every attribute is decoded (pydicom converts a value when it is first read, and raises
    for one of the wrong length), and the numbers the loader reads are checked, so a damaged
    header is refused naming the attribute instead of failing somewhere in the loader."""
    for tag in list(ds.keys()):
        try:
            ds[tag]
        except Exception as error:
            return f"attribute {tag} cannot be decoded ({type(error).__name__})"
    for keyword, count in _NUMBERS.items():
        value = ds.get(keyword)
        if keyword not in ds and keyword not in _REQUIRED:
            continue
        if value is None or value == "":
            return f"{keyword} is {'empty' if keyword in ds else 'missing'}"
        values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            return f"{keyword} is not a number"
        if count < 0:
            usable = len(numbers) == 1 and numbers[0].is_integer() and numbers[0] >= 0
            expected = "an integer >= 0"
        else:
            usable = len(numbers) == count and bool(np.all(np.isfinite(numbers)))
            expected = f"{count} finite number(s)"
        if not usable:
            return f"{keyword} is not {expected}"
    return None
