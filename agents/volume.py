"""Volumes from spooled series: the one way a series becomes an array with geometry.

highdicom does the work: `get_volume_from_series` (single-frame slices) and
`Image.get_volume` (enhanced multi-frame) sort planes by position, check that they form a
regularly spaced stack and apply the modality rescale. What is ours: refusing a series with a
reason that names the problem (highdicom says only "not a volume"), the slice direction of the
result, and the list of source datasets in slice order.

Tolerances (each a module constant):

- orientation: every plane's row and column direction cosines have a dot product of at least
  ``1 - ORIENTATION_TOL`` with the first plane's (1e-6, about 0.08°: DS rounding passes, a
  re-planned stack does not);
- slice spacing: every step between neighbouring planes along the normal is within
  ``SPACING_ATOL_MM`` (0.02 mm, twice the 0.01 mm to which some scanners round positions) of
  the mean step; a step at or below that tolerance is a duplicate position;
- stacking direction: highdicom's default: the line through the planes is within
  ``PERPENDICULAR_TOL`` (1e-3 in dot product, about 2.6°) of the slice normal, so gantry-tilted
  stacks are refused rather than silently sheared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from highdicom.spatial import get_volume_positions
from pydicom.dataset import Dataset
from pydicom.uid import RTDoseStorage, SegmentationStorage
from sqlalchemy import select

from agents.header_values import header_problem
from radloop.db import Instance, Series, Store

ORIENTATION_TOL = 1e-6
SPACING_ATOL_MM = 0.02
PERPENDICULAR_TOL = 1e-3
_PIXEL_GROUP = 0x7FE00000  # (7FE0,xxxx): pixel data and its offset tables
_GEOMETRY = ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient")
# What pydicom's decoders and highdicom raise for a dataset they cannot make pixels of.
_DECODE_ERRORS = (
    RuntimeError,
    ValueError,
    NotImplementedError,
    KeyError,
    AttributeError,
    TypeError,
)
# Stored values with the modality rescale only (HU for CT), and the stacking tolerances above.
_VOLUME_OPTIONS: dict[str, Any] = {
    "dtype": np.float32,
    "apply_real_world_transform": False,
    "apply_voi_transform": False,
    "apply_presentation_lut": False,
    "apply_palette_color_lut": False,
    "apply_icc_profile": False,
    "atol": SPACING_ATOL_MM,
    "perpendicular_tol": PERPENDICULAR_TOL,
}
# Pixel data that is not an acquired image: label maps (radloop's own drafts among them, once
# they are back from Orthanc) and dose grids.
_NOT_IMAGES: dict[str, str] = {SegmentationStorage: "a segmentation", RTDoseStorage: "an RT dose"}


class SeriesRejected(ValueError):
    """The series cannot be loaded as one volume; str(self) is a short reason without patient
    data."""


@dataclass(frozen=True)
class LoadedSeries:
    """One series as a volume.

    `array` is float32 with the modality rescale applied (HU for CT), shape (slices, rows,
    columns); slice 0 lies lowest along the slice normal, the cross product of the row and
    column direction cosines of ImageOrientationPatient. `affine` maps (slice, row, column, 1)
    to DICOM patient coordinates (LPS, mm). `spacing` is (slice, row, column) in mm, the slice
    step measured from positions (for a single slice: SpacingBetweenSlices, else 1.0).
    `source` holds the source datasets in slice order without pixel data (one dataset for a
    multi-frame instance); `source_frames` the 1-based frame number of each slice (all 1 for
    single-frame slices).
    """

    array: npt.NDArray[np.float32]
    spacing: tuple[float, float, float]
    affine: npt.NDArray[np.float64]
    frame_of_reference_uid: str
    study_uid: str
    series_uid: str
    source: list[Dataset]
    source_frames: list[int]


def load_series(paths: Sequence[Path], *, min_slices: int = 1) -> LoadedSeries:
    """Load the files of one series as a volume, reading each file once.

    The files are either single-frame slices or one multi-frame instance whose geometry is in
    its functional groups. File names and InstanceNumber play no part in the order. Raises
    `SeriesRejected` when the files are not one regularly spaced stack of at least
    `min_slices` greyscale planes of one series, or when pixel data cannot be decoded.
    """
    if not paths:
        raise SeriesRejected("no files")
    datasets = [_read(path, index, len(paths)) for index, path in enumerate(paths)]
    _require_one_value(datasets, "StudyInstanceUID", "studies")
    _require_one_value(datasets, "SeriesInstanceUID", "series")
    multiframe = sum(_is_multiframe(ds) for ds in datasets)
    if multiframe and len(datasets) > 1:
        raise SeriesRejected(
            f"{multiframe} multi-frame instance(s) among {len(datasets)} files: a volume is "
            "one multi-frame instance or a set of single-frame slices"
        )
    for ds in datasets:
        _require_greyscale(ds)
    if multiframe:
        return _load_multiframe(datasets[0], min_slices)
    return _load_single_frames(datasets, min_slices)


def series_files(store: Store, spool_dir: Path, series_uid: str) -> list[Path]:
    """The spool files of a series, in the order they were received (empty if unknown)."""
    query = (
        select(Instance.path)
        .join(Series, Instance.series_id == Series.id)
        .where(Series.series_uid == series_uid)
        .order_by(Instance.id)
    )
    with store.read() as session:
        relative = session.scalars(query).all()
    return [spool_dir / path for path in relative]


def _read(path: Path, index: int, count: int) -> Dataset:
    # Reasons name a file by its place in the list: file names may carry patient names.
    try:
        ds = pydicom.dcmread(path)
    except Exception as error:  # pydicom raises many kinds for a damaged file
        raise SeriesRejected(
            f"file {index + 1} of {count} is unreadable: {type(error).__name__}"
        ) from error
    if "PixelData" not in ds:
        raise SeriesRejected(f"file {index + 1} of {count} is not an image (no pixel data)")
    if "TransferSyntaxUID" not in ds.file_meta:
        raise SeriesRejected(f"file {index + 1} of {count} names no transfer syntax")
    problem = header_problem(ds)
    if problem is not None:
        raise SeriesRejected(f"file {index + 1} of {count}: {problem}")
    kind = _NOT_IMAGES.get(str(ds.get("SOPClassUID", "")))
    if kind is not None:
        raise SeriesRejected(f"file {index + 1} of {count} is {kind}, not an image")
    return ds


def _require_one_value(datasets: Sequence[Dataset], keyword: str, what: str) -> None:
    values = {str(ds.get(keyword, "")) for ds in datasets}
    if len(values) > 1:
        raise SeriesRejected(f"files belong to {len(values)} {what}")


def _require_greyscale(ds: Dataset) -> None:
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if ds.get("SamplesPerPixel", 1) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise SeriesRejected(f"not a greyscale image (PhotometricInterpretation {photometric})")


def _is_multiframe(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames") or 1) > 1


def _require_min_slices(count: int, min_slices: int) -> None:
    if count < min_slices:
        raise SeriesRejected(f"too few slices: {count}, the minimum is {min_slices}")


def _load_single_frames(datasets: list[Dataset], min_slices: int) -> LoadedSeries:
    _require_min_slices(len(datasets), min_slices)
    for keyword in (*_GEOMETRY, "PixelSpacing"):
        if any(keyword not in ds for ds in datasets):
            raise SeriesRejected(f"missing {keyword}")
    _require_one_value(datasets, "FrameOfReferenceUID", "frames of reference")
    if len({(ds.Rows, ds.Columns) for ds in datasets}) > 1:
        raise SeriesRejected("slices differ in rows or columns")
    # Exact, as highdicom compares them: a real series repeats the same DS strings.
    if len({tuple(float(v) for v in ds.PixelSpacing) for ds in datasets}) > 1:
        raise SeriesRejected("slices differ in pixel spacing")
    orientations = np.array([ds.ImageOrientationPatient for ds in datasets], dtype=np.float64)
    positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=np.float64)
    _check_orientations(orientations)
    _check_positions(positions, orientations[0])
    try:
        volume = hd.get_volume_from_series(
            datasets, orientation_tol=ORIENTATION_TOL, **_VOLUME_OPTIONS
        )
    except _DECODE_ERRORS as error:
        # Geometry was checked above with highdicom's own rules, so what is left is pixels.
        raise SeriesRejected(_decode_reason(error)) from error
    headers = [_without_pixels(ds) for ds in datasets]
    return _result(volume, positions, headers, [1] * len(datasets))


def _load_multiframe(ds: Dataset, min_slices: int) -> LoadedSeries:
    frames = int(ds.get("NumberOfFrames") or 1)
    _require_min_slices(frames, min_slices)
    if "FrameOfReferenceUID" not in ds:
        raise SeriesRejected("missing FrameOfReferenceUID")
    positions, orientations, pixel_spacings = _frame_planes(ds, frames)
    if len({tuple(row) for row in pixel_spacings}) > 1:
        raise SeriesRejected("frames differ in pixel spacing")
    _check_orientations(orientations)
    _check_positions(positions, orientations[0])
    header = _without_pixels(ds)
    try:
        # copy=False: the dataset is ours and its pixel data may be large.
        image = hd.Image.from_dataset(ds, copy=False)
    except ValueError as error:  # e.g. big endian transfer syntax
        raise SeriesRejected(f"unsupported multi-frame instance: {_first_line(error)}") from error
    try:
        volume = image.get_volume(**_VOLUME_OPTIONS)
    except _DECODE_ERRORS as error:
        raise SeriesRejected(_decode_reason(error)) from error
    return _result(volume, positions, [header], list(range(1, frames + 1)))


def _frame_planes(
    ds: Dataset, frames: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Position, orientation and pixel spacing of each frame from the functional groups.

    highdicom keeps these in private tables, so they are read here; a per-frame group
    overrides the shared one (PS3.3 C.7.6.16).
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if per_frame and len(per_frame) != frames:
        raise SeriesRejected("per-frame functional groups do not match NumberOfFrames")
    shared_groups = ds.get("SharedFunctionalGroupsSequence") or [Dataset()]
    rows: list[list[float]] = []
    for index in range(frames):
        item = per_frame[index] if per_frame else Dataset()
        row: list[float] = []
        for sequence, keyword in (
            ("PlanePositionSequence", "ImagePositionPatient"),
            ("PlaneOrientationSequence", "ImageOrientationPatient"),
            ("PixelMeasuresSequence", "PixelSpacing"),
        ):
            value = _group_value(item, shared_groups[0], sequence, keyword)
            if value is None:
                raise SeriesRejected(f"missing {keyword} in the functional groups")
            row.extend(float(v) for v in value)
        rows.append(row)
    table = np.array(rows, dtype=np.float64)
    return table[:, 0:3], table[:, 3:9], table[:, 9:11]


def _group_value(
    item: Dataset, shared: Dataset, sequence: str, keyword: str
) -> Sequence[float] | None:
    for group in (item, shared):
        macro = group.get(sequence)
        if macro and keyword in macro[0]:
            value: Sequence[float] = macro[0][keyword].value
            return value
    return None


def _check_orientations(orientations: npt.NDArray[np.float64]) -> None:
    reference = orientations[0]
    rows = orientations[:, :3] @ reference[:3]
    columns = orientations[:, 3:] @ reference[3:]
    if (np.minimum(rows, columns) < 1.0 - ORIENTATION_TOL).any():
        raise SeriesRejected("mixed orientations: planes differ in ImageOrientationPatient")


def _fits(
    positions: npt.NDArray[np.float64],
    orientation: npt.NDArray[np.float64],
    *,
    perpendicular_tol: float = PERPENDICULAR_TOL,
    allow_missing: bool = False,
) -> bool:
    spacing, _ = get_volume_positions(
        positions.tolist(),
        orientation.tolist(),
        atol=SPACING_ATOL_MM,
        perpendicular_tol=perpendicular_tol,
        allow_missing_positions=allow_missing,
    )
    return spacing is not None


def _check_positions(
    positions: npt.NDArray[np.float64], orientation: npt.NDArray[np.float64]
) -> None:
    """Refuse positions that are not one regular stack, saying what is wrong with them.

    highdicom only answers yes or no; asking it again with one rule relaxed at a time names
    the rule that failed.
    """
    if _fits(positions, orientation):
        return
    normal = np.cross(orientation[:3], orientation[3:])
    steps = np.diff(np.sort(positions @ normal))
    detail = f"steps {steps.min():.3f} to {steps.max():.3f} mm"
    # Along the normal, not highdicom's exact equality of whole positions, so that a repeated
    # slice shifted in-plane also counts as a duplicate.
    duplicates = int((steps <= SPACING_ATOL_MM).sum())
    if duplicates:
        raise SeriesRejected(f"duplicate positions: {duplicates} slice(s) repeat a position")
    if _fits(positions, orientation, allow_missing=True):
        raise SeriesRejected(f"gap: slices missing from the stack ({detail})")
    if _fits(positions, orientation, perpendicular_tol=2.0):
        raise SeriesRejected("slices are not stacked along the slice normal (gantry tilt?)")
    raise SeriesRejected(f"non-uniform slice spacing ({detail})")


def _result(
    volume: hd.Volume,
    positions: npt.NDArray[np.float64],
    sources: list[Dataset],
    frame_numbers: list[int],
) -> LoadedSeries:
    # highdicom stacks a right-handed (slice, row, column) volume, which runs against
    # row x column; flipping the slice axis makes slice 0 the lowest along that normal.
    volume = volume.ensure_handedness(hd.AxisHandedness.LEFT_HANDED, flip_axis=0)
    affine = np.asarray(volume.affine, dtype=np.float64)
    indices = (positions - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    slices = np.rint(indices[:, 0]).astype(np.int64)
    order = np.argsort(slices)
    if not np.array_equal(slices[order], np.arange(len(slices))):
        raise RuntimeError("highdicom's slice order disagrees with the plane positions")
    if len(sources) > 1:
        sources = [sources[i] for i in order]
    first = sources[0]
    spacing = volume.spacing
    return LoadedSeries(
        array=np.ascontiguousarray(volume.array, dtype=np.float32),
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        affine=affine,
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        study_uid=str(first.StudyInstanceUID),
        series_uid=str(first.SeriesInstanceUID),
        source=sources,
        source_frames=[frame_numbers[i] for i in order],
    )


def _without_pixels(ds: Dataset) -> Dataset:
    """The dataset as `stop_before_pixels` would have read it, sharing its elements."""
    # Iterating a Dataset yields converted elements; its keys are the tags, left raw here.
    tags = [tag for tag in ds.keys() if tag < _PIXEL_GROUP]  # noqa: SIM118
    header = Dataset({tag: ds.get_item(tag) for tag in tags})
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None:
        header.file_meta = file_meta
    return header


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _decode_reason(error: BaseException) -> str:
    return f"cannot decode pixel data: {_first_line(error)}"
