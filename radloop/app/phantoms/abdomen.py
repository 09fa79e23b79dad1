"""Abdominal CT phantoms with ground-truth organ masks, so the loop can run without patients.

A study is chosen, recorded, then rendered: `sample_parameters(seed)` draws every size,
position and HU value from `numpy.random.default_rng(seed)`; `render(parameters)` turns them
into an int16 HU volume and a uint8 label volume (both indexed `[slice, row, column]`);
`write_study` writes the CT as DICOM, the labels as NIfTI and a `truth.json` sidecar.

Geometry is DICOM patient space (LPS, mm): columns run to the patient's left (+x), rows to
posterior (+y), slices to superior (+z), so the liver (patient right) shows on the image left.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from pydicom.uid import generate_uid

from radloop.app.phantoms.ct import CtSeriesHeader, write_ct_slice

Volume = NDArray[np.float32]

AIR_HU = -1000.0
SERIES_DESCRIPTION = "PHANTOM ABDOMEN CT"


class PhantomLabel(IntEnum):
    """Values in the ground-truth mask; 0 is everything else."""

    LIVER = 1
    SPLEEN = 2
    KIDNEY = 3


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid in patient space: centre (x, y, z) and semi-axes in mm, turned in-plane."""

    center: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    angle_deg: float = 0.0


@dataclass(frozen=True)
class PhantomParameters:
    """Every random choice behind one phantom; `render` is a pure function of these."""

    seed: int
    size: int
    slices: int
    pixel_spacing: float
    slice_thickness: float
    body_center: tuple[float, float]
    body_semi_axes: tuple[float, float]
    body_wobble: tuple[float, float, float]  # relative amplitude, period mm, phase rad
    fat_mm: float
    wall_mm: float
    spine_center: tuple[float, float]
    vertebra_radius: float
    disc_period: tuple[float, float]  # period mm, phase mm
    aorta_center: tuple[float, float]
    aorta_radius: float
    liver: tuple[Ellipsoid, ...]
    spleen: Ellipsoid
    kidneys: tuple[Ellipsoid, Ellipsoid]
    gas: tuple[Ellipsoid, ...]
    hu: dict[str, float]
    noise_sigma: float
    texture_seed: int


@dataclass(frozen=True)
class Phantom:
    """One rendered study. Arrays are `[slice, row, column]`; `spacing` is mm in that order;
    `origin` is the LPS position (mm) of voxel (0, 0, 0), i.e. slice 0's ImagePositionPatient."""

    hu: NDArray[np.int16]
    labels: NDArray[np.uint8]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    parameters: PhantomParameters

    @property
    def seed(self) -> int:
        return self.parameters.seed

    def position(self, slice_: int, row: int, column: int) -> tuple[float, float, float]:
        """LPS patient position (mm) of a voxel centre, as the DICOM geometry defines it."""
        dz, dy, dx = self.spacing
        x0, y0, z0 = self.origin
        return (x0 + column * dx, y0 + row * dy, z0 + slice_ * dz)

    def nifti_affine(self) -> NDArray[np.float64]:
        """Affine of the NIfTI mask: voxel (i=column, j=row, k=slice) to RAS mm (x, y negated)."""
        dz, dy, dx = self.spacing
        x0, y0, z0 = self.origin
        return np.array(
            [[-dx, 0, 0, -x0], [0, -dy, 0, -y0], [0, 0, dz, z0], [0, 0, 0, 1]], dtype=np.float64
        )


def _u(rng: np.random.Generator, low: float, high: float, digits: int = 1) -> float:
    return round(float(rng.uniform(low, high)), digits)


def sample_parameters(seed: int, size: int = 128) -> PhantomParameters:
    """Draw a phantom's anatomy, HU values and noise from `default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    slices = int(rng.integers(48, 65))
    pixel_spacing = round(float(rng.choice(np.arange(2.5, 3.01, 0.05))), 2)
    thickness = float(rng.choice([3.0, 3.5, 4.0, 4.5, 5.0]))
    cx, cy = _u(rng, -10, 10), _u(rng, -10, 10)
    a, b = _u(rng, 125, 150), _u(rng, 95, 118)
    fat, wall = _u(rng, 10, 25), _u(rng, 8, 12)
    ai, bi = a - fat - wall, b - fat - wall  # the abdominal cavity
    sx, sy = cx + _u(rng, -5, 5), cy + b - _u(rng, 70, 80)
    radius = _u(rng, 16, 21)
    liver_z = _u(rng, 15, 45)
    liver = (
        Ellipsoid(
            (cx - ai * _u(rng, 0.45, 0.6, 2), cy - bi * _u(rng, 0.0, 0.15, 2), liver_z),
            (_u(rng, 50, 65), _u(rng, 60, 80), _u(rng, 55, 75)),
            _u(rng, -15, 15),
        ),
        Ellipsoid(
            (cx - _u(rng, 5, 20), cy - bi * _u(rng, 0.4, 0.5, 2), liver_z + _u(rng, 5, 20)),
            (_u(rng, 40, 55), _u(rng, 20, 30), _u(rng, 30, 45)),
            _u(rng, -10, 10),
        ),
    )
    spleen = Ellipsoid(
        (cx + ai * _u(rng, 0.55, 0.65, 2), cy + bi * _u(rng, 0.2, 0.35, 2), _u(rng, 15, 45)),
        (_u(rng, 22, 32), _u(rng, 40, 55), _u(rng, 40, 55)),
        _u(rng, -40, -20),
    )
    kidney_z = _u(rng, -45, -15)
    kidneys = tuple(
        Ellipsoid(
            (sx + side * _u(rng, 55, 70), sy + _u(rng, -5, 10), kidney_z + side * _u(rng, 0, 15)),
            (_u(rng, 22, 28), _u(rng, 25, 32), _u(rng, 45, 55)),
            side * _u(rng, 20, 35),
        )
        for side in (-1, 1)
    )
    gas = tuple(
        Ellipsoid(
            (cx + _u(rng, -40, 40), cy - bi * _u(rng, 0.2, 0.6, 2), _u(rng, -60, 20)),
            (_u(rng, 6, 15), _u(rng, 6, 12), _u(rng, 6, 20)),
        )
        for _ in range(int(rng.integers(1, 5)))
    )
    hu = {
        "fat": _u(rng, -110, -90),
        "muscle": _u(rng, 40, 55),
        "cavity": _u(rng, -5, 15),
        "liver": _u(rng, 56, 66),
        "spleen": _u(rng, 40, 47),
        "kidney": _u(rng, 140, 170),
        "aorta": _u(rng, 170, 210),
        "cancellous": _u(rng, 400, 480),
        "cortical": _u(rng, 650, 750),
        "disc": _u(rng, 70, 100),
        "csf": _u(rng, 5, 15),
    }
    return PhantomParameters(
        seed=seed,
        size=size,
        slices=slices,
        pixel_spacing=pixel_spacing,
        slice_thickness=thickness,
        body_center=(cx, cy),
        body_semi_axes=(a, b),
        body_wobble=(_u(rng, 0.02, 0.07, 3), _u(rng, 150, 300), _u(rng, 0, 2 * math.pi, 3)),
        fat_mm=fat,
        wall_mm=wall,
        spine_center=(sx, sy),
        vertebra_radius=radius,
        disc_period=(_u(rng, 28, 34), _u(rng, 0, 28)),
        aorta_center=(sx + _u(rng, 10, 20), sy - radius - _u(rng, 10, 15)),
        aorta_radius=_u(rng, 10, 13),
        liver=liver,
        spleen=spleen,
        kidneys=(kidneys[0], kidneys[1]),
        gas=gas,
        hu=hu,
        noise_sigma=_u(rng, 10, 20),
        texture_seed=int(rng.integers(2**31)),
    )


class _Grid:
    """Voxel-centre coordinates (LPS mm), shaped to broadcast to `[slice, row, column]`."""

    def __init__(self, p: PhantomParameters) -> None:
        self.shape = (p.slices, p.size, p.size)
        self.spacing = (p.slice_thickness, p.pixel_spacing, p.pixel_spacing)
        # Rounded so that DICOM's decimal strings and the NIfTI affine say the same positions.
        self.origin = (
            round(-(p.size - 1) / 2 * p.pixel_spacing, 3),
            round(-(p.size - 1) / 2 * p.pixel_spacing, 3),
            round(-(p.slices - 1) / 2 * p.slice_thickness, 3),
        )
        self.x = (self.origin[0] + np.arange(p.size) * p.pixel_spacing).astype(np.float32)
        self.y = (self.origin[1] + np.arange(p.size) * p.pixel_spacing).astype(np.float32)
        self.z = (self.origin[2] + np.arange(p.slices) * p.slice_thickness).astype(np.float32)
        self.X = self.x[None, None, :]
        self.Y = self.y[None, :, None]
        self.Z = self.z[:, None, None]

    def smooth_field(self, rng: np.random.Generator, components: int = 6) -> Volume:
        """Low-frequency noise (wavelengths 60–160 mm), about unit variance."""
        field = np.zeros(self.shape, np.float32)
        for _ in range(components):
            direction = rng.normal(size=3)
            k = 2 * np.pi / rng.uniform(60, 160) * direction / np.linalg.norm(direction)
            phase = rng.uniform(0, 2 * np.pi)
            wave = (
                np.exp(1j * (k[2] * self.z + phase))[:, None, None]
                * np.exp(1j * k[1] * self.y)[None, :, None]
                * np.exp(1j * k[0] * self.x)[None, None, :]
            )
            field += wave.real.astype(np.float32)
        return field * np.float32(math.sqrt(2 / components))

    def radius(self, e: Ellipsoid) -> Volume:
        """Normalised ellipsoid radius: < 1 inside `e`."""
        turn = math.radians(e.angle_deg)
        dx, dy, dz = self.X - e.center[0], self.Y - e.center[1], self.Z - e.center[2]
        u = math.cos(turn) * dx + math.sin(turn) * dy
        v = -math.sin(turn) * dx + math.cos(turn) * dy
        ax, ay, az = e.semi_axes
        result: Volume = np.sqrt((u / ax) ** 2 + (v / ay) ** 2 + (dz / az) ** 2)
        return result

    def ellipse(self, center: tuple[float, float], ax: Volume, ay: Volume) -> Volume:
        """Normalised elliptic-cylinder radius with per-slice semi-axes `ax`, `ay`."""
        result: Volume = np.sqrt(
            ((self.X - center[0]) / ax) ** 2 + ((self.Y - center[1]) / ay) ** 2
        )
        return result


def _blur(volume: Volume, sigmas: tuple[float, float, float]) -> Volume:
    """Separable Gaussian blur (sigmas in voxels per axis), edges extended."""
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0:
            continue
        reach = max(1, math.ceil(3 * sigma))
        taps = np.exp(-0.5 * (np.arange(-reach, reach + 1) / sigma) ** 2)
        taps /= taps.sum()
        pad = [(0, 0)] * volume.ndim
        pad[axis] = (reach, reach)
        padded = np.pad(volume, pad, mode="edge")
        out = np.zeros_like(volume)
        length = volume.shape[axis]
        for offset, weight in enumerate(taps):
            out += np.float32(weight) * np.take(padded, range(offset, offset + length), axis=axis)
        volume = out
    return volume


def render(p: PhantomParameters) -> Phantom:
    """The phantom `p` describes: blurred, noisy HU (int16) and the crisp labels behind it."""
    grid = _Grid(p)
    rng = np.random.default_rng(p.texture_seed)
    hu = np.full(grid.shape, AIR_HU, np.float32)
    labels = np.zeros(grid.shape, np.uint8)

    def paint(mask: NDArray[np.bool_], value: float | Volume, label: int = 0) -> None:
        hu[mask] = value[mask] if isinstance(value, np.ndarray) else value
        labels[mask] = label

    amplitude, period, phase = p.body_wobble
    scale = (1 + amplitude * np.sin(2 * np.pi * grid.Z / period + phase)).astype(np.float32)
    a, b = p.body_semi_axes[0] * scale, p.body_semi_axes[1] * scale
    paint(grid.ellipse(p.body_center, a, b) <= 1, p.hu["fat"])
    paint(grid.ellipse(p.body_center, a - p.fat_mm, b - p.fat_mm) <= 1, p.hu["muscle"])
    inset = p.fat_mm + p.wall_mm
    cavity = grid.ellipse(p.body_center, a - inset, b - inset) <= 1
    texture = p.hu["cavity"] + 30 * grid.smooth_field(rng)
    paint(cavity, np.clip(texture, p.hu["fat"], 40))
    for bubble in p.gas:
        paint(cavity & (grid.radius(bubble) <= 1), AIR_HU + 50)

    sx, sy = p.spine_center
    r = p.vertebra_radius
    for side in (-1, 1):
        muscle = Ellipsoid((sx + side * 38, sy + r + 18, 0), (22, 18, 1e6))
        paint(grid.radius(muscle) <= 1, p.hu["muscle"])
    organs = (
        ((p.kidneys[0],), PhantomLabel.KIDNEY, "kidney"),
        ((p.kidneys[1],), PhantomLabel.KIDNEY, "kidney"),
        (p.liver, PhantomLabel.LIVER, "liver"),
        ((p.spleen,), PhantomLabel.SPLEEN, "spleen"),
    )
    for blobs, label, tissue in organs:
        field = grid.smooth_field(rng, components=4)
        inside = np.min([grid.radius(e) for e in blobs], axis=0) <= 1 + 0.12 * field
        paint(cavity & inside, p.hu[tissue] + 3 * field, label)
    for kidney in p.kidneys:  # renal sinus fat at the hilum, facing the spine
        inward = 1 if kidney.center[0] < sx else -1
        ax, ay, az = kidney.semi_axes
        hilum = Ellipsoid(
            (kidney.center[0] + inward * 0.75 * ax, kidney.center[1] - 0.2 * ay, kidney.center[2]),
            (0.45 * ax, 0.35 * ay, 0.45 * az),
        )
        paint((labels == PhantomLabel.KIDNEY) & (grid.radius(hilum) <= 1), p.hu["fat"] + 30)

    aorta = Ellipsoid((*p.aorta_center, 0), (p.aorta_radius, p.aorta_radius, 1e6))
    paint(grid.radius(aorta) <= 1, p.hu["aorta"])
    period_mm, offset = p.disc_period
    disc = np.broadcast_to(((grid.Z - offset) % period_mm) < 6, grid.shape)
    body = grid.radius(Ellipsoid((sx, sy, 0), (r, r * 0.85, 1e6))) <= 1
    shell = body & ~(grid.radius(Ellipsoid((sx, sy, 0), (r - 3, r * 0.85 - 3, 1e6))) <= 1)
    paint(body & ~disc, p.hu["cancellous"])
    paint(shell & ~disc, p.hu["cortical"])
    paint(body & disc, p.hu["disc"])
    canal = Ellipsoid((sx, sy + r + 7, 0), (8, 7, 1e6))
    process = Ellipsoid((sx, sy + r + 25, 0), (5, 12, 1e6))
    paint(grid.radius(process) <= 1, p.hu["cortical"])
    paint(grid.radius(canal) <= 1, p.hu["csf"])

    # Partial-volume edges, then CT-like (slightly correlated) noise.
    smooth = _blur(hu, (0.5, 0.7, 0.7))
    noise = _blur(rng.standard_normal(grid.shape, np.float32), (0.0, 0.6, 0.6))
    smooth += noise * np.float32(p.noise_sigma / float(noise.std()))
    volume = np.clip(np.rint(smooth), -1024, 3071).astype(np.int16)
    return Phantom(volume, labels, grid.spacing, grid.origin, p)


def generate(seed: int, size: int = 128) -> Phantom:
    """The phantom for `seed`: the same seed always gives the same volumes."""
    return render(sample_parameters(seed, size))


@dataclass(frozen=True)
class WrittenStudy:
    """Where one phantom study went on disk, and the UIDs that tie DICOM to its truth."""

    index: int
    seed: int
    study_uid: str
    series_uid: str
    slices: int
    dicom_dir: Path
    truth: Path
    truth_json: Path

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (the `radloop demo data --json` row)."""
        return {
            "index": self.index,
            "seed": self.seed,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "slices": self.slices,
            "dicom_dir": str(self.dicom_dir),
            "truth": str(self.truth),
        }


def write_study(
    root: Path, index: int, seed: int | None = None, acquired: datetime | None = None
) -> WrittenStudy:
    """Generate phantom `seed` (default: `index`) and write it under `root/<index:04d>/`.

    Writes `dicom/slice0000.dcm ...` (one CT slice per file, in position order),
    `truth.nii.gz` (uint8 labels, axes column/row/slice, RAS affine from `nifti_affine`) and
    `truth.json`. UIDs are new on every call; `.dcm` files left by an earlier run are removed
    so the folder only ever holds one series.
    """
    seed = index if seed is None else seed
    phantom = generate(seed)
    folder = root / f"{index:04d}"
    dicom_dir = folder / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    for stale in dicom_dir.glob("*.dcm"):
        stale.unlink()
    dz, dy, dx = phantom.spacing
    header = CtSeriesHeader(
        study_uid=generate_uid(),
        series_uid=generate_uid(),
        frame_of_reference_uid=generate_uid(),
        pixel_spacing=(dy, dx),
        slice_thickness=dz,
        description=SERIES_DESCRIPTION,
        patient_name=f"PHANTOM^{seed:04d}",
        patient_id=f"PHANTOM-{seed:04d}",
        body_part="ABDOMEN",
        acquired=acquired or datetime.now(UTC),
    )
    for k in range(phantom.hu.shape[0]):
        path = dicom_dir / f"slice{k:04d}.dcm"
        write_ct_slice(path, phantom.hu[k], header, k, phantom.position(k, 0, 0))

    truth = _save_mask(phantom, folder / "truth.nii.gz")
    truth_json = folder / "truth.json"
    truth_json.write_text(json.dumps(_truth_record(phantom, header, index), indent=2) + "\n")
    return WrittenStudy(
        index=index,
        seed=seed,
        study_uid=header.study_uid,
        series_uid=header.series_uid,
        slices=phantom.hu.shape[0],
        dicom_dir=dicom_dir,
        truth=truth,
        truth_json=truth_json,
    )


def _save_mask(phantom: Phantom, path: Path) -> Path:
    """Labels as NIfTI: axes (column, row, slice), q- and s-form both scanner space (code 1)."""
    # nibabel's constructors and header setters carry no annotations.
    data = np.ascontiguousarray(phantom.labels.transpose(2, 1, 0))
    image = nib.Nifti1Image(data, None)  # type: ignore[no-untyped-call]
    image.set_sform(phantom.nifti_affine(), code=1)  # type: ignore[no-untyped-call]
    image.set_qform(phantom.nifti_affine(), code=1)  # type: ignore[no-untyped-call]
    image.header.set_xyzt_units("mm")  # type: ignore[no-untyped-call]
    nib.save(image, path)
    return path


def _truth_record(phantom: Phantom, header: CtSeriesHeader, index: int) -> dict[str, Any]:
    voxel_ml = math.prod(phantom.spacing) / 1000
    return {
        "study_uid": header.study_uid,
        "series_uid": header.series_uid,
        "frame_of_reference_uid": header.frame_of_reference_uid,
        "index": index,
        "seed": phantom.seed,
        "labels": {label.name.lower(): label.value for label in PhantomLabel},
        "volumes_ml": {
            label.name.lower(): round(float((phantom.labels == label).sum()) * voxel_ml, 1)
            for label in PhantomLabel
        },
        "shape": list(phantom.hu.shape),
        "axes": ["slice", "row", "column"],
        "spacing": list(phantom.spacing),
        "origin_lps": list(phantom.origin),
        "nifti": {
            "file": "truth.nii.gz",
            "axes": ["column", "row", "slice"],
            "space": "RAS (x and y of DICOM LPS negated)",
        },
        "parameters": asdict(phantom.parameters),
    }
