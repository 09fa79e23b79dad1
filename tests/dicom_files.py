"""Every DICOM file a test sends comes from here: generated series, `pydicom-data` files,
and deliberately broken inputs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID, RLELossless, generate_uid

from radloop.app.phantoms.ct import ct_series

# Real files shipped by pydicom-data, each a distinct SOP instance: name -> what it exercises.
# dcmtk has no JPEG 2000 codec, so storescu cannot propose J2K; pynetdicom sends those.
# Values: the storescu option that proposes the file's own transfer syntax first.
REAL_FILES_FOR_STORESCU = {
    "CT_small.dcm": "-xe",  # CT, explicit VR little endian
    "liver.dcm": "-xe",  # Segmentation Storage, 3 frames
    "MR_small_jpeg_ls_lossless.dcm": "-xt",  # MR, JPEG-LS lossless
    "emri_small_RLE.dcm": "-xr",  # Enhanced MR, 10 frames, RLE lossless
}
REAL_FILES_J2K = {
    "693_J2KR.dcm": "CT, 512x512, JPEG 2000 lossless",
    "MR2_J2KR.dcm": "MR, 1024x1024, JPEG 2000 lossless",
}
UNSUPPORTED_SOP_CLASS_FILE = "rtplan.dcm"  # RT Plan: not a class radloop accepts


def real_file(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom-data does not ship {name}"
    return Path(str(path))


def real_dataset(name: str) -> Dataset:
    return dcmread(real_file(name))


def generated_ct(folder: Path, slices: int, size: int = 64, **kwargs: object) -> list[Path]:
    return ct_series(folder, slices, size=size, **kwargs)  # type: ignore[arg-type]


def with_uid(source: Path, keyword: str, value: str | None, target: Path) -> Path:
    """A copy of `source` whose `keyword` is replaced (or removed when `value` is None).

    The SOP Instance UID is refreshed so the copy is a new instance unless it is the one edited.
    """
    ds = dcmread(source)
    ds = copy.deepcopy(ds)
    if keyword != "SOPInstanceUID":
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if value is None:
        del ds[keyword]
    else:
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = UID(value)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=False)
    return target


def truncated(source: Path, target: Path, keep: float = 0.6) -> Path:
    data = source.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[: int(len(data) * keep)])
    return target


# --- Multi-frame inputs for volume loading (agents.volume) ---------------------------------

# pydicom-data's Enhanced MR files ship without plane geometry; `enhanced_mr_with_planes`
# gives one of them a sagittal orientation and a position per frame.
ENHANCED_MR_FILES = (
    "emri_small.dcm",  # explicit VR little endian
    "emri_small_RLE.dcm",  # RLE lossless: pydicom's own decoder
    "emri_small_jpeg_2k_lossless.dcm",  # JPEG 2000: needs Pillow/openjpeg or pylibjpeg
    "emri_small_jpeg_ls_lossless.dcm",  # JPEG-LS: needs pyjpegls or pylibjpeg
)
ENHANCED_MR_ORIENTATION = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # normal (row x column) is -x
ENHANCED_MR_ORIGIN = (10.0, -20.0, 30.0)


def enhanced_mr_with_planes(
    name: str,
    target: Path,
    slots: list[int],
    spacing: float = 1.2,
    pixel_spacing: tuple[float, float] = (0.9, 0.8),
) -> Path:
    """A copy of a pydicom-data Enhanced MR whose frame i lies `slots[i]` steps of `spacing`
    mm along the slice normal from `ENHANCED_MR_ORIGIN` (orientation and pixel measures in
    the shared functional groups, positions per frame)."""
    ds = real_dataset(name)
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(ENHANCED_MR_ORIENTATION)
    measures = Dataset()
    measures.PixelSpacing = list(pixel_spacing)
    measures.SliceThickness = spacing
    shared = Dataset()
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    cosines = np.array(ENHANCED_MR_ORIENTATION)
    normal = np.cross(cosines[:3], cosines[3:])
    frames = []
    for slot in slots:
        position = Dataset()
        xyz = np.array(ENHANCED_MR_ORIGIN) + slot * spacing * normal
        position.ImagePositionPatient = [round(float(v), 4) for v in xyz]
        frame = Dataset()
        frame.PlanePositionSequence = [position]
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target


def enhanced_ct(folder: Path, slices: int, size: int = 32) -> tuple[Path, list[Path]]:
    """A generated CT series and its legacy-converted Enhanced CT (highdicom), RLE compressed.

    Returns the multi-frame file and the single-frame files it was built from.
    """
    paths = generated_ct(folder / "single", slices, size=size)
    converted = LegacyConvertedEnhancedCTImage(
        [dcmread(path) for path in paths],
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    converted.compress(RLELossless)
    target = folder / "enhanced.dcm"
    converted.save_as(target, enforce_file_format=True)
    return target, paths
