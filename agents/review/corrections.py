"""A reader's label for a draft, from a DICOM SEG (OHIF's save, any SEG writer) or a NIfTI
file (3D Slicer, ITK-SNAP), checked against the draft's series and model spec and turned into
a label map in that series' voxel grid.

Every refusal is an `InvalidLabel` whose message says what is wrong, for the HTTP answer.
"""

from __future__ import annotations

import gzip
import os
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import SegmentationStorage

from agents.drafts import nifti_affine

# Dice(draft, correction) is the correction effort; one implementation, in agents.metrics.
from agents.metrics import dice_per_label as dice_per_label
from agents.metrics import mean_dice as mean_dice
from agents.volume import LoadedSeries
from radloop.modelspec import ModelSpec

# Voxel positions agree when within this many millimetres.
_GEOMETRY_TOLERANCE_MM = 0.01
# DICOM 2024: one frame per source plane, pixel values = segment numbers. OHIF 3.13 saves this.
LABEL_MAP_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.7"
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
    mapping = _segment_values(ds, spec)
    if ds.SOPClassUID == LABEL_MAP_SEGMENTATION or ds.get("SegmentationType") == "LABELMAP":
        return _label_map_frames(ds, series, mapping)
    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    except (AttributeError, ValueError, KeyError) as error:
        raise InvalidLabel(f"not a valid DICOM SEG: {error}") from None
    source_uids = [str(item.SOPInstanceUID) for item in series.source]
    frame_sources = {uid for _, _, uid in seg.get_source_image_uids()}
    outside = frame_sources - set(source_uids)
    if outside:
        raise InvalidLabel(f"the SEG references {len(outside)} image(s) outside the draft series")
    numbers = sorted(mapping)
    try:
        if len(series.source) == 1:
            masks = seg.get_pixels_by_source_frame(
                source_sop_instance_uid=source_uids[0],
                source_frame_numbers=list(series.source_frames),
                segment_numbers=numbers,
                assert_missing_frames_are_empty=True,
            )
        else:
            masks = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=source_uids,
                segment_numbers=numbers,
                assert_missing_frames_are_empty=True,
            )
    except (ValueError, KeyError, RuntimeError) as error:
        raise InvalidLabel(f"the SEG's frames do not map onto the series: {error}") from None
    label_map = np.zeros(series.array.shape, dtype=np.uint8)
    for index, number in enumerate(numbers):
        label_map[np.asarray(masks[..., index]) > 0.5] = mapping[number]
    return label_map


def _label_map_frames(
    ds: Dataset, series: LoadedSeries, mapping: dict[int, int]
) -> NDArray[np.uint8]:
    """A LABELMAP SEG read frame by frame. highdicom 0.28 cannot open the ones OHIF 3.13 writes
    (no FrameContentSequence), so each frame is placed by the source image it derives from,
    else by its position."""
    slices = {str(item.SOPInstanceUID): index for index, item in enumerate(series.source)}
    if len(series.source) == 1:
        slices = {}  # a multi-frame source: frames are placed by position
    positions = (
        series.affine[:3, :3]
        @ np.stack(
            [
                np.arange(series.array.shape[0]),
                np.zeros(series.array.shape[0]),
                np.zeros(series.array.shape[0]),
            ]
        )
        + series.affine[:3, 3:4]
    )
    try:
        pixels = ds.pixel_array
    except Exception as error:  # pydicom's decoders raise many kinds
        raise InvalidLabel(f"the SEG's pixel data cannot be decoded: {error}") from None
    pixels = pixels.reshape((-1, *pixels.shape[-2:]))
    frames = ds.get("PerFrameFunctionalGroupsSequence", [])
    if len(frames) != len(pixels):
        raise InvalidLabel("the SEG has a different number of frames than functional groups")
    unknown = sorted(set(np.unique(pixels).tolist()) - {0, *mapping})
    if unknown:
        raise InvalidLabel(f"the SEG's pixels hold segment numbers {unknown} it does not describe")
    lookup = np.zeros(max(mapping, default=0) + 1, dtype=np.uint8)
    for number, value in mapping.items():
        lookup[number] = value
    label_map = np.zeros(series.array.shape, dtype=np.uint8)
    for frame, item in zip(pixels, frames, strict=True):
        index = _frame_slice(item, slices, positions)
        label_map[index] = np.maximum(label_map[index], lookup[frame])
    return label_map


def _frame_slice(item: Dataset, slices: dict[str, int], positions: NDArray[Any]) -> int:
    for derivation in item.get("DerivationImageSequence", []):
        for source in derivation.get("SourceImageSequence", []):
            uid = str(source.get("ReferencedSOPInstanceUID", ""))
            if uid in slices:
                return slices[uid]
            if slices:
                raise InvalidLabel("a SEG frame derives from an image outside the draft series")
    try:
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
    except (AttributeError, IndexError):
        raise InvalidLabel("a SEG frame says neither its source image nor its position") from None
    distances = np.linalg.norm(positions - position[:, None], axis=0)
    index = int(np.argmin(distances))
    if distances[index] > 0.5:
        raise InvalidLabel("a SEG frame lies where the draft series has no slice")
    return index


def nifti_label_map(data: bytes, series: LoadedSeries, spec: ModelSpec) -> NDArray[np.uint8]:
    """The label map of a NIfTI label on the series' voxel grid (any axis order or flips)."""
    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        image = nib.Nifti1Image.from_bytes(raw)
        values = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many kinds for a damaged file
        raise InvalidLabel(f"not a readable NIfTI file: {error}") from None
    if values.ndim == 4 and values.shape[3] == 1:
        values = values[..., 0]
    if values.ndim != 3:
        raise InvalidLabel(f"the NIfTI is {values.ndim}-D, a label map is 3-D")
    target = nifti_affine(series)
    # The upload's voxel axes in the target's voxel space: a permutation with flips, or no fit.
    to_target = np.linalg.inv(target) @ image.affine
    orientation = nib.orientations.io_orientation(to_target)  # type: ignore[no-untyped-call]
    values = nib.orientations.apply_orientation(values, orientation)  # type: ignore[no-untyped-call]
    flip = nib.orientations.inv_ornt_aff(orientation, image.shape[:3])  # type: ignore[no-untyped-call]
    affine = image.affine @ flip
    expected = tuple(reversed(series.array.shape))
    if values.shape != expected or not np.allclose(affine, target, atol=_GEOMETRY_TOLERANCE_MM):
        raise InvalidLabel(
            f"the NIfTI's grid {values.shape} does not match the draft series {expected} "
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
    return np.ascontiguousarray(values.astype(np.uint8).transpose(2, 1, 0))


def require_not_empty(label_map: NDArray[Any]) -> None:
    if not label_map.any():
        raise InvalidLabel("the label is empty: no voxel belongs to any segment")


def write_nifti(array: NDArray[Any], series: LoadedSeries, path: Path) -> None:
    """`array` (slice, row, column) as RAS NIfTI on the series' grid, replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array.transpose(2, 1, 0), nifti_affine(series))  # type: ignore[no-untyped-call]
    image.header.set_xyzt_units("mm")  # type: ignore[no-untyped-call]
    partial = path.with_name(path.name + ".partial.nii.gz")
    nib.save(image, partial)
    os.replace(partial, path)


def read_nifti_label(path: Path) -> NDArray[np.uint8]:
    """A label NIfTI radloop wrote, back in (slice, row, column) order."""
    image = nib.nifti1.load(path)  # type: ignore[no-untyped-call]
    return np.ascontiguousarray(np.asarray(image.dataobj, dtype=np.uint8).transpose(2, 1, 0))
