"""Synthetic CT series written as real DICOM files: no patient behind them.

Used by tests, benchmarks and the demo. Slices carry the geometry a real CT would (position,
orientation, spacing, rescale) so downstream volume loading can be exercised honestly.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)


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
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference = generate_uid()
    now = datetime.now(UTC)
    yy, xx = np.mgrid[0:size, 0:size]
    body = ((yy - size / 2) / (size * 0.42)) ** 2 + ((xx - size / 2) / (size * 0.36)) ** 2 <= 1
    paths = []
    for index in range(slices):
        hu = np.where(body, 40, -1000).astype(np.int16)
        hu = hu + rng.normal(0, 12, hu.shape).astype(np.int16)
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_of_reference
        ds.Modality = "CT"
        ds.PatientName = "PHANTOM^SYNTHETIC"
        ds.PatientID = "PHANTOM-0001"
        ds.StudyDate = ds.SeriesDate = now.strftime("%Y%m%d")
        ds.StudyTime = now.strftime("%H%M%S")
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.SeriesNumber = 1
        ds.InstanceNumber = index + 1
        ds.SeriesDescription = "SYNTHETIC CT"
        ds.ImagePositionPatient = [-size * spacing / 2, -size * spacing / 2, index * thickness]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = thickness
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.PixelData = hu.tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = folder / f"slice{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
