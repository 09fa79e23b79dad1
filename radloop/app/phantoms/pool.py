"""A heterogeneous phantom pool: mostly common studies, plus rarer sub-populations a model
trained on the common ones finds hard — what an active-learning strategy should find.

Each study's sub-population is drawn from its seed (`subpopulation_of`), then its common
anatomy is changed (`vary`): all from seeded generators, so a pool is reproducible. The
sub-population is recorded in the study's `truth.json` (`parameters.subpopulation`) and
nowhere a strategy looks: DICOM headers and radloop's database never carry it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from radloop.app.phantoms.anatomy import Ellipsoid, PhantomParameters, sample_parameters

COMMON = "common"
# Share of the pool per sub-population (they add up to 1).
SUBPOPULATIONS: dict[str, float] = {
    COMMON: 0.60,
    # Arterial phase: the spleen and kidney cortex enhance, the liver hardly yet.
    "arterial": 0.08,
    # Hepatosplenomegaly: liver and spleen well beyond the usual size.
    "enlarged": 0.08,
    # Ptotic kidneys and a spleen and liver pushed down: organs where the model does not look.
    "displaced": 0.08,
    # Hypodense liver lesions, labelled liver (as liver segmentation includes tumours).
    "lesions": 0.08,
    # Low-dose or large-patient noise, three to five times the usual.
    "noisy": 0.04,
    # Another field of view: a short upper-abdomen scan that cuts the organs.
    "fov": 0.04,
}


def subpopulation_of(seed: int) -> str:
    """The sub-population of pool study `seed` (the mixture above, drawn from the seed)."""
    names = list(SUBPOPULATIONS)
    weights = np.array([SUBPOPULATIONS[name] for name in names])
    rng = np.random.default_rng([seed, 0xA1])
    return str(names[int(rng.choice(len(names), p=weights / weights.sum()))])


def _scaled(
    e: Ellipsoid, factor: float, shift: tuple[float, float, float] = (0, 0, 0)
) -> Ellipsoid:
    center = tuple(c + d for c, d in zip(e.center, shift, strict=True))
    axes = tuple(a * factor for a in e.semi_axes)
    return Ellipsoid((center[0], center[1], center[2]), (axes[0], axes[1], axes[2]), e.angle_deg)


def vary(p: PhantomParameters, name: str) -> PhantomParameters:
    """`p` (a common phantom) as a member of sub-population `name`."""
    if name not in SUBPOPULATIONS:
        raise ValueError(f"unknown sub-population {name!r} (known: {', '.join(SUBPOPULATIONS)})")
    rng = np.random.default_rng([p.seed, 0xB2])

    def u(low: float, high: float) -> float:
        return round(float(rng.uniform(low, high)), 1)

    if name == COMMON:
        return p
    if name == "arterial":
        hu = {
            **p.hu,
            "liver": u(70, 85),
            "spleen": u(115, 140),
            "kidney": u(200, 250),
            "aorta": u(280, 350),
        }
        return replace(p, hu=hu, subpopulation=name)
    if name == "enlarged":
        liver = u(1.25, 1.4)
        return replace(
            p,
            liver=tuple(_scaled(e, liver) for e in p.liver),
            spleen=_scaled(p.spleen, u(1.4, 1.7)),
            subpopulation=name,
        )
    if name == "displaced":
        down = -u(25, 40)
        return replace(
            p,
            kidneys=(
                _scaled(p.kidneys[0], 1.0, (0, 0, down)),
                _scaled(p.kidneys[1], 1.0, (0, 0, down - u(0, 10))),
            ),
            spleen=_scaled(p.spleen, 1.0, (-u(10, 25), 0, -u(15, 30))),
            liver=tuple(_scaled(e, 1.0, (0, 0, -u(10, 20))) for e in p.liver),
            subpopulation=name,
        )
    if name == "lesions":
        lobe = p.liver[0]
        lesions = tuple(
            Ellipsoid(
                tuple(  # type: ignore[arg-type]
                    c + float(rng.uniform(-0.5, 0.5)) * a
                    for c, a in zip(lobe.center, lobe.semi_axes, strict=True)
                ),
                (u(8, 18), u(8, 18), u(8, 18)),
            )
            for _ in range(int(rng.integers(2, 6)))
        )
        return replace(p, lesions=lesions, hu={**p.hu, "lesion": u(5, 30)}, subpopulation=name)
    if name == "noisy":
        return replace(p, noise_sigma=u(45, 70), subpopulation=name)
    # fov: a short scan centred a little above the kidneys.
    return replace(p, slices=int(rng.integers(22, 31)), subpopulation=name)


def pool_parameters(seed: int, size: int = 128) -> PhantomParameters:
    """Pool study `seed`: its common anatomy, varied into its drawn sub-population."""
    return vary(sample_parameters(seed, size), subpopulation_of(seed))
