"""A DICOM SEG as a label map on the voxel grid of the series it segments: the one conversion.

Today it reads radloop's own drafts back (tests, checks) and every correction a reader uploads
as a SEG (`agents.review.corrections`, which first checks study, series, frame of reference
and segment names).

Frames are placed by the source image (and frame) each one references, with highdicom's
`get_pixels_by_source_instance` / `get_pixels_by_source_frame`: a SEG made on the series maps
onto it exactly, whatever its frame order, and left-out empty frames (OHIF, dcmjs) read as
empty. highdicom 0.28's `Segmentation.get_volume` + `Volume.match_geometry` was tried and not
kept: a SEG holding a few non-adjacent frames and no SpacingBetweenSlices gets its slice step
from the gap between them, and the match then refuses ("Non-integer scale factor required").

The one exception is a LABELMAP SEG that highdicom 0.28 cannot open (OHIF 3.13 writes them
without FrameContentSequence): its frames are placed by referenced source image, else by
position.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset

from agents.volume import LoadedSeries

# DICOM 2024: one frame per source plane, pixel values = segment numbers. OHIF 3.13 saves this.
LABEL_MAP_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.7"
# A LABELMAP frame placed by its position must lie within this distance of a slice centre.
_POSITION_TOLERANCE_MM = 0.5
# A FRACTIONAL segment covers a voxel from this fraction up (after highdicom's rescale to 0..1).
_FRACTION_COVERED = 0.5


class SegDoesNotFit(ValueError):
    """The SEG cannot be read as a label map of this series; the message says why."""


def label_map_from_seg(
    ds: Dataset, series: LoadedSeries, values: Mapping[int, int] | None = None
) -> NDArray[np.uint8]:
    """The label map (shape `series.array.shape`) that the SEG `ds` holds for `series`.

    A voxel holds `values[n]` for the highest-numbered segment n covering it, else 0; only the
    segments in `values` are read (None: every segment, holding its own number). Frames that
    the SEG leaves out must be empty, and no frame may derive from an image outside `series`.
    Raises `SegDoesNotFit` saying what does not fit."""
    if values is None:
        values = {int(item.SegmentNumber): int(item.SegmentNumber) for item in ds.SegmentSequence}
    if ds.get("SOPClassUID") == LABEL_MAP_SEGMENTATION or ds.get("SegmentationType") == "LABELMAP":
        return _label_map_frames(ds, series, values)
    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    except (AttributeError, ValueError, KeyError) as error:
        raise SegDoesNotFit(f"not a valid DICOM SEG: {error}") from None
    source_uids = [str(item.SOPInstanceUID) for item in series.source]
    frame_sources = {uid for _, _, uid in seg.get_source_image_uids()}
    outside = frame_sources - set(source_uids)
    if outside:
        raise SegDoesNotFit(f"the SEG references {len(outside)} image(s) outside the series")
    numbers = sorted(values)
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
        raise SegDoesNotFit(f"the SEG's frames do not map onto the series: {error}") from None
    label_map = np.zeros(series.array.shape, dtype=np.uint8)
    for index, number in enumerate(numbers):  # ascending: the highest segment number wins
        label_map[np.asarray(masks[..., index]) > _FRACTION_COVERED] = values[number]
    return label_map


def _label_map_frames(
    ds: Dataset, series: LoadedSeries, values: Mapping[int, int]
) -> NDArray[np.uint8]:
    """A LABELMAP SEG read frame by frame, each placed by the source image it derives from,
    else by its position."""
    slices = {str(item.SOPInstanceUID): index for index, item in enumerate(series.source)}
    if len(series.source) == 1:
        slices = {}  # a multi-frame source: frames are placed by position
    count = series.array.shape[0]
    positions = (
        series.affine[:3, :3] @ np.stack([np.arange(count), np.zeros(count), np.zeros(count)])
        + series.affine[:3, 3:4]
    )
    try:
        pixels = ds.pixel_array
    except Exception as error:  # pydicom's decoders raise many kinds
        raise SegDoesNotFit(f"the SEG's pixel data cannot be decoded: {error}") from None
    pixels = pixels.reshape((-1, *pixels.shape[-2:]))
    frames = ds.get("PerFrameFunctionalGroupsSequence", [])
    if len(frames) != len(pixels):
        raise SegDoesNotFit("the SEG has a different number of frames than functional groups")
    described = {int(item.SegmentNumber) for item in ds.SegmentSequence}
    unknown = sorted(set(np.unique(pixels).tolist()) - {0} - described)
    if unknown:
        raise SegDoesNotFit(f"the SEG's pixels hold segment numbers {unknown} it does not describe")
    lookup = np.zeros(max(described | set(values), default=0) + 1, dtype=np.uint8)
    for number, value in values.items():
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
                raise SegDoesNotFit("a SEG frame derives from an image outside the series")
    try:
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
    except (AttributeError, IndexError):
        raise SegDoesNotFit("a SEG frame says neither its source image nor its position") from None
    distances = np.linalg.norm(positions - position[:, None], axis=0)
    index = int(np.argmin(distances))
    if distances[index] > _POSITION_TOLERANCE_MM:
        raise SegDoesNotFit("a SEG frame lies where the series has no slice")
    return index
