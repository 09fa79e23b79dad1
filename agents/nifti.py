"""NIfTI in radloop: the one reader, the one writer and the one LPS→RAS affine; and NRRD, the
label file OHIF's MONAI Label panel reads and 3D Slicer may upload.

Today it writes draft label maps (`agents.drafts`), corrected label maps and the image/label
training pairs of validated corrections (`agents.review`); it reads uploaded NIfTI and NRRD
corrections (`agents.review.corrections`) and the label maps radloop wrote. The trainer's
dataset loading and the phantom generator's ground truth are to use it too (they are being
restructured).

Two conventions meet here, and only here:

- radloop's arrays are (slice, row, column), with an affine from those indices to DICOM patient
  space (LPS, mm): `LoadedSeries.affine`;
- a NIfTI file holds voxel (i, j, k) = (column, row, slice), with an affine to RAS (x and y of
  LPS negated), as nibabel, 3D Slicer and ITK-SNAP read it.

`write_nifti` and `read_nifti` take and give radloop's convention, so no caller transposes an
array or flips an affine; so do `nrrd_label_bytes` and `read_nrrd` (NRRD is LPS or RAS, column
fastest). Files are written durably (`radloop.durable`), with the s-form and q-form both the
scanner's space (code 1) and millimetre units.
"""

from __future__ import annotations

import gzip
import io
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import nrrd
import numpy as np
from numpy.typing import DTypeLike, NDArray

from radloop.durable import durable_path

# NIfTI is RAS, DICOM patient space LPS: negate x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# NIfTI voxel (i, j, k) = (column, row, slice) <-> radloop's (slice, row, column): its own inverse.
_REVERSE_AXES = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
# NIfTI's xform code for "scanner-based anatomical coordinates": DICOM patient space is that.
_SCANNER = 1
_GZIP_MAGIC = b"\x1f\x8b"


class NotAVolume(ValueError):
    """The NIfTI's data is not one 3-D volume; the message says its dimensions."""


def lps_to_ras_affine(affine: NDArray[Any]) -> NDArray[np.float64]:
    """The NIfTI affine ((column, row, slice) -> RAS mm) of a grid whose radloop affine is
    `affine` ((slice, row, column) -> LPS mm)."""
    return np.asarray(_LPS_TO_RAS @ np.asarray(affine, dtype=np.float64) @ _REVERSE_AXES)


def ras_to_lps_affine(affine: NDArray[Any]) -> NDArray[np.float64]:
    """The inverse of `lps_to_ras_affine`: a NIfTI affine as radloop's."""
    return np.asarray(_LPS_TO_RAS @ np.asarray(affine, dtype=np.float64) @ _REVERSE_AXES)


def voxel_spacing(affine: NDArray[Any]) -> tuple[float, float, float]:
    """(slice, row, column) spacing in mm of a radloop affine."""
    slice_, row, column = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return float(slice_), float(row), float(column)


def write_nifti(path: Path, array: NDArray[Any], affine: NDArray[Any]) -> None:
    """Write `array` ((slice, row, column), on the grid of the radloop `affine`) as NIfTI at
    `path` (gzip-compressed when it ends in `.gz`), atomically and durably."""
    if array.ndim != 3:
        raise NotAVolume(f"a {array.ndim}-D array is not a volume")
    nifti_affine = lps_to_ras_affine(affine)
    # nibabel's constructors and header setters carry no annotations.
    image = nib.Nifti1Image(array.transpose(2, 1, 0), None)  # type: ignore[no-untyped-call]
    image.set_sform(nifti_affine, code=_SCANNER)  # type: ignore[no-untyped-call]
    image.set_qform(nifti_affine, code=_SCANNER)  # type: ignore[no-untyped-call]
    image.header.set_xyzt_units("mm")  # type: ignore[no-untyped-call]
    with durable_path(path) as temporary:
        nib.save(image, temporary)


def read_nifti(
    source: Path | bytes, *, dtype: DTypeLike | None = None
) -> tuple[NDArray[Any], NDArray[np.float64]]:
    """A NIfTI file (a path, or its bytes, gzip-compressed or not) as radloop's (slice, row,
    column) array and (slice, row, column) -> LPS affine.

    The array has the file's scaling applied and is cast to `dtype` when given. A trailing axis
    of length 1 (x, y, z, 1) is dropped; any other shape raises `NotAVolume`. nibabel's own
    errors for a damaged file pass through."""
    if isinstance(source, bytes):
        raw = gzip.decompress(source) if source[:2] == _GZIP_MAGIC else source
        image = nib.Nifti1Image.from_bytes(raw)
    else:
        image = nib.nifti1.load(source)  # type: ignore[no-untyped-call]
    values = np.asarray(image.dataobj, dtype=dtype)
    while values.ndim > 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim != 3:
        raise NotAVolume(f"the NIfTI is {values.ndim}-D, not one 3-D volume")
    # nibabel reads NIfTI in Fortran order, so the transposed array is C-contiguous: no copy.
    array = np.ascontiguousarray(values.transpose(2, 1, 0))
    return array, ras_to_lps_affine(np.asarray(image.affine, dtype=np.float64))


def read_label_map(path: Path) -> NDArray[np.uint8]:
    """A label map NIfTI (radloop's drafts, corrections and training labels, the phantoms'
    truth) as uint8 (slice, row, column)."""
    return read_nifti(path, dtype=np.uint8)[0]


def nrrd_label_bytes(labels: NDArray[Any], affine: NDArray[Any]) -> bytes:
    """A label map ((slice, row, column), on the grid of the radloop `affine`) as an
    uncompressed uint8 NRRD: column fastest, then row, then slice, which is the order of the
    voxels of the series' volume in OHIF (its MONAI Label panel copies them in unread)."""
    if labels.ndim != 3:
        raise NotAVolume(f"a {labels.ndim}-D array is not a volume")
    grid = np.asarray(affine, dtype=np.float64)
    header = {
        "encoding": "raw",
        "space": "left-posterior-superior",
        # NRRD's axes go fastest first: column, row, slice.
        "space directions": np.stack([grid[:3, 2], grid[:3, 1], grid[:3, 0]]),
        "space origin": grid[:3, 3],
        "kinds": ["domain", "domain", "domain"],
    }
    out = io.BytesIO()
    nrrd.write(out, np.ascontiguousarray(labels, dtype=np.uint8), header, index_order="C")
    return out.getvalue()


# NRRD spaces radloop reads, as the sign of x and y against DICOM's LPS.
_NRRD_SPACES = {
    "left-posterior-superior": 1.0,
    "lps": 1.0,
    "right-anterior-superior": -1.0,
    "ras": -1.0,
}


def read_nrrd(
    data: bytes, *, max_voxels: int
) -> tuple[NDArray[Any], NDArray[np.float64], dict[str, Any]]:
    """An NRRD file's bytes (data attached: a `.nrrd` label map or 3D Slicer's `.seg.nrrd`) as
    radloop's (slice, row, column) array, its (slice, row, column) -> LPS affine, and the header
    (a `.seg.nrrd` names its segments there).

    Refused with `NotAVolume`, before any data is read: a detached data file (its path would be
    opened on this server), anything but 3 dimensions, more than `max_voxels` voxels, a space
    other than LPS or RAS, or no space directions. pynrrd's own errors for a damaged file pass
    through."""
    source = io.BytesIO(data)
    header = nrrd.read_header(source)
    if {"data file", "datafile"} & set(header):
        raise NotAVolume("the NRRD names a detached data file; send one file with its data")
    sizes = [int(size) for size in header.get("sizes", [])]
    if int(header.get("dimension", 0)) != 3 or len(sizes) != 3:
        raise NotAVolume(f"the NRRD's sizes {sizes} are not those of one 3-D volume")
    if math.prod(sizes) > max_voxels:
        raise NotAVolume(f"the NRRD holds {math.prod(sizes)} voxels, more than {max_voxels}")
    sign = _NRRD_SPACES.get(str(header.get("space", "")).lower())
    if sign is None:
        raise NotAVolume(f"the NRRD's space {header.get('space')!r} is neither LPS nor RAS")
    directions = np.asarray(header.get("space directions"), dtype=np.float64)
    if directions.shape != (3, 3) or not np.all(np.isfinite(directions)):
        raise NotAVolume("the NRRD has no 3x3 space directions")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    values = nrrd.read_data(header, source, index_order="C")
    # NRRD's axes go fastest first (column, row, slice); index_order="C" reverses them.
    affine = np.eye(4)
    affine[:3, :3] = directions[::-1].T
    affine[:3, 3] = origin
    affine[:2] *= sign
    return np.asarray(values), affine, header
