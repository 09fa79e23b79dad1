"""Synthetic CT series written as real DICOM files: no patient behind them.

Used by tests, benchmarks and the demo. Slices carry the geometry a real CT would (position,
orientation, spacing, rescale) so downstream volume loading can be exercised honestly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)


@dataclass(frozen=True)
class CtSeriesHeader:
    """What every slice of one synthetic CT series shares.

    `pixel_spacing` is DICOM PixelSpacing: (between rows, between columns) in mm. The patient
    is always fake: name and ID must say PHANTOM so nobody mistakes the files for real ones.
    """

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    pixel_spacing: tuple[float, float]
    slice_thickness: float
    description: str = "SYNTHETIC CT"
    patient_name: str = "PHANTOM^SYNTHETIC"
    patient_id: str = "PHANTOM-0001"
    body_part: str | None = None
    acquired: datetime = field(default_factory=lambda: datetime.now(UTC))


def write_ct_slice(
    path: Path,
    hu: NDArray[np.int16],
    header: CtSeriesHeader,
    index: int,
    position: tuple[float, float, float],
) -> Path:
    """Write one axial CT slice as a Part 10 file (Explicit VR Little Endian) and return `path`.

    `hu` is stored as signed 16-bit with RescaleSlope 1 and RescaleIntercept 0, so the stored
    values are the Hounsfield units. `position` is ImagePositionPatient (LPS, mm) of the first
    pixel; the orientation is axial ([1,0,0,0,1,0]); InstanceNumber is `index + 1`.
    """
    if hu.ndim != 2 or hu.dtype != np.int16:
        raise ValueError(f"a CT slice is a 2-D int16 array, not {hu.ndim}-D {hu.dtype}")
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = header.study_uid
    ds.SeriesInstanceUID = header.series_uid
    ds.FrameOfReferenceUID = header.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Manufacturer = "radloop synthetic"
    ds.PatientName = header.patient_name
    ds.PatientID = header.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = header.acquired.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = header.acquired.strftime("%H%M%S")
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.SeriesDescription = header.description
    if header.body_part is not None:
        ds.BodyPartExamined = header.body_part
    ds.PatientPosition = "HFS"
    ds.KVP = ""
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = position[2]
    ds.PixelSpacing = list(header.pixel_spacing)
    ds.SliceThickness = header.slice_thickness
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.PixelData = hu.astype("<i2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_series(
    folder: Path,
    slices: int,
    size: int = 512,
    study_uid: str | None = None,
    series_uid: str | None = None,
    seed: int = 0,
    spacing: float = 0.8,
    thickness: float = 2.5,
) -> list[Path]:
    """Write `slices` CT slices (16-bit, `size`×`size`) of one series; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    header = CtSeriesHeader(
        study_uid=study_uid or generate_uid(),
        series_uid=series_uid or generate_uid(),
        frame_of_reference_uid=generate_uid(),
        pixel_spacing=(spacing, spacing),
        slice_thickness=thickness,
    )
    yy, xx = np.mgrid[0:size, 0:size]
    body = ((yy - size / 2) / (size * 0.42)) ** 2 + ((xx - size / 2) / (size * 0.36)) ** 2 <= 1
    corner = -size * spacing / 2
    paths = []
    for index in range(slices):
        hu = np.where(body, 40, -1000).astype(np.int16)
        hu = hu + rng.normal(0, 12, hu.shape).astype(np.int16)
        position = (corner, corner, index * thickness)
        paths.append(write_ct_slice(folder / f"slice{index:04d}.dcm", hu, header, index, position))
    return paths
