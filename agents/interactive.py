"""The interactive (DeepEdit-style) model: training with simulated clicks, the simulated reader
that clicks where the label is most wrong, and Dice after clicks, which gates it and which
`bench/interactive.py` reports.

One network does both jobs DeepEdit's does: with no clicks and an empty label it segments, and
with clicks on a label it refines that label. Training mixes the cases a reader meets: no clicks
(auto), clicks on an empty label, clicks on a damaged label, and — like MONAI's DeepEdit
`Interaction` — clicks on the network's own answer, placed where that answer is wrong.

Clicks are (channel, slice, row, column) on the image's own grid; channel 0 is background and
channel n the label whose value is n. The click maps and the network input are made by
`model_registry.triton_model.clicks.interactive_input`, the code Triton runs, so training sees what
serving sees. Clicks are placed with scipy's connected components and distance transform;
MONAI's `FindDiscrepancyRegionsDeepEditd` / `AddRandomGuidanceDeepEditd` do the same on
MONAI's dictionary format per label name, which would mean a second click representation
beside the one Triton reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage

from agents.metrics import dice_per_label
from agents.trainer import TrainingConfig, TrainingReport, fit
from model_registry.repository import inference_config
from model_registry.triton_model.clicks import interactive_input, refine
from model_registry.triton_model.window import resample
from radloop.modelspec import Interactive, ModelSpec

Clicks = NDArray[np.int64]  # n × 4: channel, slice, row, column
Refiner = Callable[[Clicks, NDArray[Any] | None], NDArray[Any]]


def no_clicks() -> Clicks:
    return np.zeros((0, 4), dtype=np.int64)


def settings_of(spec: ModelSpec) -> Interactive:
    if spec.interactive is None:
        raise ValueError(f"model {spec.name} declares no interactive model")
    return spec.interactive


# -- the simulated reader ---------------------------------------------------------------


def _centre(region: NDArray[np.bool_]) -> tuple[int, int, int]:
    """The voxel of `region` farthest from its edge: where a reader clicks on a blob."""
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1, 1:-1]
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(depth)), region.shape))  # type: ignore[return-value]


def reader_clicks(current: NDArray[Any], truth: NDArray[Any], values: Sequence[int]) -> Clicks:
    """One click per label that is wrong: at the centre of the largest region where `current`
    and `truth` disagree about that label, saying what the voxel truly is (the label, or
    background or another label where the label spilled over)."""
    clicks = []
    for value in values:
        wrong = (current == value) != (truth == value)
        if not wrong.any():
            continue
        parts, count = ndimage.label(wrong)
        sizes = np.bincount(parts.ravel(), minlength=count + 1)[1:]
        at = _centre(parts == 1 + int(np.argmax(sizes)))
        clicks.append((int(truth[at]), *at))
    return np.asarray(clicks, dtype=np.int64).reshape(-1, 4)


def dice_after_clicks(
    run: Refiner,
    truth: NDArray[Any],
    spec: ModelSpec,
    rounds: int,
    start: NDArray[Any] | None = None,
) -> list[dict[str, float]]:
    """Dice per label after 0…`rounds` rounds of `reader_clicks` (one click per wrong label
    each round), clicks accumulating. Round 0 is `start` (a draft) or, without one, the
    interactive model's answer to no clicks."""
    values = [label.value for label in spec.labels]
    current = start if start is not None else run(no_clicks(), None)
    clicks = no_clicks()
    scores = [dice_per_label(current, truth, spec)]
    for _ in range(rounds):
        new = reader_clicks(current, truth, values)
        if len(new):
            clicks = np.concatenate([clicks, new])
            current = run(clicks, current)
        scores.append(dice_per_label(current, truth, spec))
    return scores


def after_clicks(
    network: torch.nn.Module,
    volume: tuple[NDArray[Any], NDArray[Any], Sequence[float]],
    spec: ModelSpec,
) -> dict[str, float]:
    """Dice per label of one (HU, labels, spacing) volume after `gate_clicks` reader rounds
    from an empty label: what the interactive model's gate compares."""
    config = inference_config(spec.as_interactive())
    hu, truth, _ = volume

    def run(clicks: Clicks, previous: NDArray[Any] | None) -> NDArray[Any]:
        return refine(network, hu, clicks, previous, config)

    return dice_after_clicks(run, truth, spec, settings_of(spec).gate_clicks)[-1]


def gate_dice(
    network: torch.nn.Module,
    volumes: Sequence[tuple[NDArray[Any], NDArray[Any], Sequence[float]]],
    spec: ModelSpec,
) -> dict[str, float]:
    """Mean over volumes of `after_clicks`, per label name."""
    finals = [after_clicks(network, volume, spec) for volume in volumes]
    return {label.name: float(np.mean([f[label.name] for f in finals])) for label in spec.labels}


# -- training ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InteractiveExample:
    """One training volume on its own grid: HU image and label map (slices, rows, columns)."""

    hu: NDArray[Any]
    labels: NDArray[Any]


def _damaged(truth: NDArray[Any], values: Sequence[int], rng: np.random.Generator) -> Any:
    """A plausible wrong draft: each label grown, shrunk, shifted or dropped, or kept."""
    damaged = np.zeros_like(truth)
    for value in values:
        mask = truth == value
        kind = rng.integers(0, 5)
        if kind == 1:
            mask = ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 4)))
        elif kind == 2:
            mask = ndimage.binary_erosion(mask, iterations=int(rng.integers(1, 4)))
        elif kind == 3:
            mask = np.roll(mask, int(rng.integers(-6, 7)), axis=int(rng.integers(0, 3)))
        elif kind == 4 and rng.random() < 0.5:
            mask = np.zeros_like(mask)
        damaged[mask & (damaged == 0)] = value
    return damaged


def _random_clicks(
    current: NDArray[Any], truth: NDArray[Any], count: int, rng: np.random.Generator
) -> Clicks:
    """`count` clicks at random voxels where `current` is wrong (anywhere in the labels
    when it is not wrong at all), each saying what the voxel truly is."""
    wrong = np.argwhere(current != truth)
    if not len(wrong):
        wrong = np.argwhere(truth > 0)
    if not len(wrong) or count == 0:
        return no_clicks()
    picks = wrong[rng.integers(0, len(wrong), count)]
    return np.asarray([(int(truth[tuple(p)]), *p) for p in picks], dtype=np.int64)


def _small(example: InteractiveExample, size: Sequence[int]) -> InteractiveExample:
    """The example on a grid near the model's size: clicks and damage are simulated there
    (a click lands on the same resized voxel either way), which keeps a step cheap."""
    labels = torch.from_numpy(example.labels.astype(np.float32))[None, None]
    hu = torch.from_numpy(example.hu.astype(np.float32))[None, None]
    return InteractiveExample(
        hu=resample(hu, size, "trilinear")[0, 0].numpy(),
        labels=resample(labels, size, "nearest")[0, 0].numpy().astype(np.uint8),
    )


def train_interactive(
    spec: ModelSpec,
    examples: Sequence[InteractiveExample],
    seed: int = 0,
    steps: int | None = None,
    initial: torch.nn.Module | None = None,
    on_step: Callable[[int, float], None] | None = None,
    device: torch.device | None = None,
) -> tuple[torch.nn.Module, TrainingReport]:
    """Train (or fine-tune `initial`) the spec's interactive model on labelled volumes with
    simulated clicks; `steps` batches (default: the spec's)."""
    settings = settings_of(spec)
    config = inference_config(spec.as_interactive())
    values = [label.value for label in spec.labels]
    small = [_small(example, settings.spatial_size) for example in examples]

    def one(example: InteractiveExample, rng: np.random.Generator, network: Any) -> Any:
        truth = example.labels
        case = rng.random()
        if case < 0.25:  # no clicks, empty label: the automatic answer
            previous, clicks = None, no_clicks()
        elif case < 0.5:  # clicks on an empty label
            previous = None
            clicks = _random_clicks(np.zeros_like(truth), truth, int(rng.integers(1, 8)), rng)
        elif case < 0.75:  # clicks on a damaged draft
            previous = _damaged(truth, values, rng)
            clicks = _random_clicks(previous, truth, int(rng.integers(0, 6)), rng)
        else:  # clicks where the network's own answer is wrong (DeepEdit's Interaction)
            clicks = _random_clicks(np.zeros_like(truth), truth, int(rng.integers(0, 3)), rng)
            network.eval()
            previous = refine(network, example.hu, clicks, None, config)
            clicks = np.concatenate([clicks, reader_clicks(previous, truth, values)])
        x = interactive_input(example.hu, clicks, previous, config, torch.device("cpu"))[0]
        if len(clicks) and rng.random() < 0.5:
            # A noisy image makes the clicks and the current label worth reading: on clean
            # phantoms the image alone fits the training set, and the network would learn to
            # ignore them (the holdout is where a reader needs them).
            x[0] += torch.randn_like(x[0]) * float(rng.uniform(0.1, 0.4))
        return x, torch.from_numpy(truth.astype(np.float32))[None]

    def batch(rng: np.random.Generator, network: torch.nn.Module) -> tuple[Any, Any]:
        picks = [small[int(i)] for i in rng.integers(0, len(small), settings.batch_size)]
        pairs = [one(example, rng, network) for example in picks]
        return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])

    network = initial if initial is not None else settings.network.build
    total = steps if steps is not None else settings.steps
    training = TrainingConfig(
        epochs=total, steps_per_epoch=1, learning_rate=settings.learning_rate, seed=seed
    )
    return fit(network, batch, training, on_step, device)


def fine_tune(
    spec: ModelSpec,
    examples: Sequence[InteractiveExample],
    config: TrainingConfig,
    initial: torch.nn.Module | None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[torch.nn.Module, list[float]]:
    """`config.epochs` × `config.steps_per_epoch` batches with simulated clicks, reported per
    epoch (mean loss) as the automatic model's fine-tune is; returns the network and the
    loss per epoch."""
    steps = config.steps_per_epoch
    losses: list[float] = []

    def step_done(step: int, loss: float) -> None:
        losses.append(loss)
        if step % steps == 0 and on_epoch is not None:
            on_epoch(step // steps, sum(losses[-steps:]) / steps)

    network, _ = train_interactive(
        spec, examples, config.seed, config.epochs * steps, initial, step_done
    )
    return network, [sum(losses[i : i + steps]) / steps for i in range(0, len(losses), steps)]
