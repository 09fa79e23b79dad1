"""A reader's label for a draft, from a DICOM SEG (OHIF's save, any SEG writer) or a NIfTI
file (3D Slicer, ITK-SNAP), checked against the draft's series and model spec and turned into
a label map in that series' voxel grid. The reading itself is `agents.segmentation` (SEG) and
`agents.nifti` (NIfTI); what is here is what makes an upload this draft's label.

Every refusal is an `InvalidLabel` whose message says what is wrong, for the HTTP answer.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import SegmentationStorage

from agents.nifti import NotAVolume, read_nifti
from agents.segmentation import LABEL_MAP_SEGMENTATION, SegDoesNotFit, label_map_from_seg
from agents.volume import LoadedSeries
from radloop.modelspec import ModelSpec

# Voxel positions agree when within this many millimetres.
_GEOMETRY_TOLERANCE_MM = 0.01
SEGMENTATION_CLASSES = (SegmentationStorage, LABEL_MAP_SEGMENTATION)


class InvalidLabel(ValueError):
    """The upload cannot be this draft's label; the message says why."""


def is_dicom(data: bytes) -> bool:
    return len(data) > 132 and data[128:132] == b"DICM"


def is_nifti(data: bytes) -> bool:
    if data[:2] == b"\x1f\x8b":
        return True
    return len(data) >= 348 and int.from_bytes(data[:4], "little") == 348


def read_dicom(data: bytes) -> Dataset:
    try:
        return dcmread(BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError) as error:
        raise InvalidLabel(f"not a readable DICOM file: {error}") from None


def _segment_values(seg: Dataset, spec: ModelSpec) -> dict[int, int]:
    """SEG segment number -> spec label value, matched by segment label or property type code."""
    by_name = {label.name.strip().lower(): label.value for label in spec.labels}
    by_code = {(label.type.scheme, label.type.code): label.value for label in spec.labels}
    mapping: dict[int, int] = {}
    for item in seg.SegmentSequence:
        name = str(getattr(item, "SegmentLabel", "")).strip()
        value = by_name.get(name.lower())
        if value is None and "SegmentedPropertyTypeCodeSequence" in item:
            code = item.SegmentedPropertyTypeCodeSequence[0]
            value = by_code.get((code.CodingSchemeDesignator, code.CodeValue))
        if value is None:
            known = ", ".join(label.name for label in spec.labels)
            raise InvalidLabel(
                f"unknown segment label {name!r} (segment {item.SegmentNumber}); "
                f"model {spec.name} knows {known}"
            )
        mapping[int(item.SegmentNumber)] = value
    return mapping


def seg_label_map(ds: Dataset, series: LoadedSeries, spec: ModelSpec) -> NDArray[np.uint8]:
    """The label map a SEG holds for `series`, or `InvalidLabel` saying why it does not fit."""
    if ds.get("SOPClassUID") not in SEGMENTATION_CLASSES:
        raise InvalidLabel(f"not a DICOM SEG (SOP Class {ds.get('SOPClassUID', 'missing')})")
    if ds.get("StudyInstanceUID") != series.study_uid:
        raise InvalidLabel("the SEG belongs to another study than the draft")
    referenced = {str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", [])}
    if referenced != {series.series_uid}:
        raise InvalidLabel(
            f"the SEG references series {sorted(referenced) or 'none'}, "
            f"the draft was made on series {series.series_uid}"
        )
    if ds.get("FrameOfReferenceUID") != series.frame_of_reference_uid:
        raise InvalidLabel("the SEG's frame of reference is not the draft series'")
    rows, columns = series.array.shape[1:]
    if (ds.Rows, ds.Columns) != (rows, columns):
        raise InvalidLabel(f"the SEG is {ds.Rows}x{ds.Columns} pixels, the series {rows}x{columns}")
    try:
        return label_map_from_seg(ds, series, _segment_values(ds, spec))
    except SegDoesNotFit as error:
        raise InvalidLabel(str(error)) from None


def nifti_label_map(data: bytes, series: LoadedSeries, spec: ModelSpec) -> NDArray[np.uint8]:
    """The label map of a NIfTI label on the series' voxel grid (any axis order or flips)."""
    try:
        values, affine = read_nifti(data)
    except NotAVolume as error:
        raise InvalidLabel(str(error)) from None
    except Exception as error:  # nibabel raises many kinds for a damaged file
        raise InvalidLabel(f"not a readable NIfTI file: {error}") from None
    target = series.affine
    # The upload's voxel axes in the series' voxel space: a permutation with flips, or no fit.
    to_target = np.linalg.inv(target) @ affine
    orientation = nib.orientations.io_orientation(to_target)  # type: ignore[no-untyped-call]
    flip = nib.orientations.inv_ornt_aff(orientation, values.shape)  # type: ignore[no-untyped-call]
    values = nib.orientations.apply_orientation(values, orientation)  # type: ignore[no-untyped-call]
    affine = affine @ flip
    if values.shape != series.array.shape or not np.allclose(
        affine, target, atol=_GEOMETRY_TOLERANCE_MM
    ):
        # In the file's (column, row, slice) order, as the uploader's tools show it.
        grid, expected = tuple(reversed(values.shape)), tuple(reversed(series.array.shape))
        raise InvalidLabel(
            f"the NIfTI's grid {grid} does not match the draft series {expected} "
            "at the same positions (resampled or another series?)"
        )
    if not np.all(np.equal(np.mod(values, 1), 0)):
        raise InvalidLabel("the NIfTI holds non-integer values; a label map holds label numbers")
    known = {0} | {label.value for label in spec.labels}
    unknown = sorted(set(np.unique(values).astype(int).tolist()) - known)
    if unknown:
        raise InvalidLabel(
            f"unknown label values {unknown}; model {spec.name} knows {sorted(known)}"
        )
    return np.ascontiguousarray(values.astype(np.uint8))


def require_not_empty(label_map: NDArray[Any]) -> None:
    if not label_map.any():
        raise InvalidLabel("the label is empty: no voxel belongs to any segment")
