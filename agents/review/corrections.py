"""A reader's label for a draft, from a DICOM SEG (OHIF's save, any SEG writer), a NIfTI file
(3D Slicer, ITK-SNAP) or an NRRD file (3D Slicer's `.nrrd` and `.seg.nrrd`), checked against the
draft's series and model spec and turned into a label map in that series' voxel grid. The
reading itself is `agents.segmentation` (SEG) and `agents.nifti` (NIfTI, NRRD); what is here is
what makes an upload this draft's label.

Every refusal is an `InvalidLabel` whose message says what is wrong, for the HTTP answer.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset, dcmread
from pydicom.uid import SegmentationStorage

from agents.nifti import NotAVolume, read_nifti, read_nrrd
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


def is_nrrd(data: bytes) -> bool:
    return data[:4] == b"NRRD"


def is_label_volume(data: bytes) -> bool:
    """A NIfTI or NRRD file: a label map on a voxel grid."""
    return is_nifti(data) or is_nrrd(data)


def read_dicom(data: bytes) -> Dataset:
    try:
        return dcmread(BytesIO(data))
    except Exception as error:  # pydicom raises many kinds for a damaged file
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
    try:
        return _seg_label_map(ds, series, spec)
    except InvalidLabel:
        raise
    except SegDoesNotFit as error:
        raise InvalidLabel(str(error)) from None
    except Exception as error:  # pydicom and highdicom raise many kinds for a damaged SEG
        first = str(error).strip().split("\n")[0][:200]
        raise InvalidLabel(f"the SEG cannot be read: {type(error).__name__}: {first}") from None


def _seg_label_map(ds: Dataset, series: LoadedSeries, spec: ModelSpec) -> NDArray[np.uint8]:
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
    if (ds.get("Rows"), ds.get("Columns")) != (rows, columns):
        size = f"{ds.get('Rows')}x{ds.get('Columns')}"
        raise InvalidLabel(f"the SEG is {size} pixels, the series {rows}x{columns}")
    return label_map_from_seg(ds, series, _segment_values(ds, spec))


def volume_label_map(data: bytes, series: LoadedSeries, spec: ModelSpec) -> NDArray[np.uint8]:
    """The label map of a NIfTI or NRRD label on the series' voxel grid (any axis order or
    flips)."""
    if is_nrrd(data):
        return _on_grid(*_nrrd_values(data, series, spec), series, spec, "NRRD")
    try:
        values, affine = read_nifti(data)
    except NotAVolume as error:
        raise InvalidLabel(str(error)) from None
    except Exception as error:  # nibabel raises many kinds for a damaged file
        raise InvalidLabel(f"not a readable NIfTI file: {error}") from None
    return _on_grid(values, affine, series, spec, "NIfTI")


def _nrrd_values(
    data: bytes, series: LoadedSeries, spec: ModelSpec
) -> tuple[NDArray[Any], NDArray[np.float64]]:
    try:
        values, affine, header = read_nrrd(data, max_voxels=series.array.size)
    except NotAVolume as error:
        raise InvalidLabel(str(error)) from None
    except Exception as error:  # pynrrd raises many kinds for a damaged file
        raise InvalidLabel(f"not a readable NRRD file: {error}") from None
    return _by_segment_name(values, header, spec), affine


def _by_segment_name(values: NDArray[Any], header: dict[str, Any], spec: ModelSpec) -> NDArray[Any]:
    """A `.seg.nrrd` names its segments (`SegmentN_Name`, `SegmentN_LabelValue`): its values
    become the spec's label values by name. A plain `.nrrd` holds the spec's values already."""
    names = sorted(key for key in header if key.startswith("Segment") and key.endswith("_Name"))
    if not names:
        return values
    by_name = {label.name.strip().lower(): label.value for label in spec.labels}
    mapped = np.zeros(values.shape, dtype=np.uint8)
    covered = np.zeros(values.shape, dtype=bool)
    for key in names:
        segment = key[: -len("_Name")]
        name = str(header[key]).strip()
        value = by_name.get(name.lower())
        if value is None:
            known = ", ".join(label.name for label in spec.labels)
            raise InvalidLabel(f"unknown segment {name!r}; model {spec.name} knows {known}")
        try:
            stored = int(str(header.get(f"{segment}_LabelValue", "1")))
        except ValueError:
            raise InvalidLabel(f"{segment}_LabelValue is not a number") from None
        mapped[values == stored] = value
        covered[values == stored] = True
    stray = sorted(set(np.unique(values[~covered]).tolist()) - {0})
    if stray:
        raise InvalidLabel(f"label values {stray[:5]} belong to no named segment")
    return mapped


def _on_grid(
    values: NDArray[Any],
    affine: NDArray[np.float64],
    series: LoadedSeries,
    spec: ModelSpec,
    kind: str,
) -> NDArray[np.uint8]:
    target = series.affine
    # The upload's voxel axes in the series' voxel space: a permutation with flips, or no fit.
    to_target = np.linalg.inv(target) @ affine
    try:
        orientation = nib.orientations.io_orientation(to_target)  # type: ignore[no-untyped-call]
        flip = nib.orientations.inv_ornt_aff(orientation, values.shape)  # type: ignore[no-untyped-call]
        values = nib.orientations.apply_orientation(values, orientation)  # type: ignore[no-untyped-call]
    except (np.linalg.LinAlgError, nib.orientations.OrientationError, ValueError):
        raise InvalidLabel(f"the {kind}'s voxel axes are degenerate (no orientation)") from None
    affine = affine @ flip
    if values.shape != series.array.shape or not np.allclose(
        affine, target, atol=_GEOMETRY_TOLERANCE_MM
    ):
        # In the file's (column, row, slice) order, as the uploader's tools show it.
        grid, expected = tuple(reversed(values.shape)), tuple(reversed(series.array.shape))
        raise InvalidLabel(
            f"the {kind}'s grid {grid} does not match the draft series {expected} "
            "at the same positions (resampled or another series?)"
        )
    if not np.all(np.equal(np.mod(values, 1), 0)):
        raise InvalidLabel(f"the {kind} holds non-integer values; a label map holds label numbers")
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
