"""The anatomy of an abdominal CT phantom: organs as ellipsoids in patient space, drawn from a
seed, and the rendered phantom they become.

A study is chosen, recorded, then rendered: `sample_parameters(seed)` draws every size,
position and HU value from `numpy.random.default_rng(seed)` into `PhantomParameters`;
`radloop.app.phantoms.render` turns them into a `Phantom`. `PhantomLabel` numbers the organs
in the ground-truth mask.

Geometry is DICOM patient space (LPS, mm): columns run to the patient's left (+x), rows to
posterior (+y), slices to superior (+z), so the liver (patient right) shows on the image left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from numpy.typing import NDArray


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
    # Hypodense lesions inside the liver (still labelled liver), and which sub-population of
    # a heterogeneous pool the phantom belongs to (`radloop.app.phantoms.pool`).
    lesions: tuple[Ellipsoid, ...] = ()
    subpopulation: str = "common"


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

    def affine(self) -> NDArray[np.float64]:
        """Voxel (slice, row, column) to LPS mm, as radloop's volumes carry it."""
        dz, dy, dx = self.spacing
        x0, y0, z0 = self.origin
        return np.array(
            [[0, 0, dx, x0], [0, dy, 0, y0], [dz, 0, 0, z0], [0, 0, 0, 1]], dtype=np.float64
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
