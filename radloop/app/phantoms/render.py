"""Rendering a phantom: `render(parameters)` turns `PhantomParameters` into an int16 HU volume
and a uint8 label volume (both indexed `[slice, row, column]`) — tissue painted layer by layer,
partial-volume edges, CT-like noise — and `generate(seed)` is sampling then rendering.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from radloop.app.phantoms.anatomy import (
    Ellipsoid,
    Phantom,
    PhantomLabel,
    PhantomParameters,
    sample_parameters,
)

Volume = NDArray[np.float32]

AIR_HU = -1000.0


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
    liver = labels == PhantomLabel.LIVER
    for lesion in p.lesions:
        paint(liver & (grid.radius(lesion) <= 1), p.hu.get("lesion", 20.0), PhantomLabel.LIVER)

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


def generate(seed: int, size: int = 128, *, pool: bool = False) -> Phantom:
    """The phantom for `seed`: the same seed always gives the same volumes. With `pool`, the
    heterogeneous pool's study `seed` (`radloop.app.phantoms.pool`)."""
    if pool:
        from radloop.app.phantoms.pool import pool_parameters

        return render(pool_parameters(seed, size))
    return render(sample_parameters(seed, size))
