"""Training with MONAI on labelled volumes: the starter model of `radloop models bootstrap`
and fine-tuning from the champion (`agents.retrain`).

Inputs go through the served model's own `preprocess` (window, resample to the spec spacing),
so a trained network sees at training time exactly what Triton feeds it. Randomness is chosen
and recorded: one seed drives patch sampling and initialisation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses.dice import DiceCELoss
from numpy.typing import NDArray

from agents.metrics import dice_per_label
from model_registry.repository import inference_config
from model_registry.triton_model.drafting import segment
from model_registry.triton_model.window import preprocess
from radloop.modelspec import ModelSpec


@dataclass(frozen=True)
class Example:
    """One training volume at the spec's spacing: image (1, S, R, C) in [0, 1], labels likewise."""

    image: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 30
    steps_per_epoch: int = 8
    batch_size: int = 2
    learning_rate: float = 2e-3
    seed: int = 0


@dataclass
class TrainingReport:
    config: TrainingConfig
    epoch_losses: list[float] = field(default_factory=list)


def prepare(
    hu: NDArray[Any], labels: NDArray[Any], spacing: Sequence[float], spec: ModelSpec
) -> Example:
    """A labelled HU volume (slices, rows, columns) as the network will see it."""
    config = inference_config(spec)
    image = preprocess(hu, spacing, config, torch.device("cpu"))[0]
    target = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))[None, None]
    target = F.interpolate(target, size=tuple(image.shape[-3:]), mode="nearest")[0]
    return Example(image=image, labels=target)


def _patch(example: Example, roi: Sequence[int], rng: np.random.Generator) -> Example:
    """A random ROI-sized patch (zero-padded where the volume is smaller)."""
    image, labels = example.image, example.labels
    pads: list[int] = []
    for size, want in zip(reversed(image.shape[-3:]), reversed(roi), strict=True):
        short = max(0, want - size)
        pads += [short // 2, short - short // 2]
    if any(pads):
        image, labels = F.pad(image, pads), F.pad(labels, pads)
    starts = [int(rng.integers(0, n - r + 1)) for n, r in zip(image.shape[-3:], roi, strict=True)]
    window = tuple(slice(s, s + r) for s, r in zip(starts, roi, strict=True))
    return Example(image=image[(slice(None), *window)], labels=labels[(slice(None), *window)])


Batch = Callable[[np.random.Generator, torch.nn.Module], tuple[torch.Tensor, torch.Tensor]]


def train(
    spec: ModelSpec,
    examples: Sequence[Example],
    config: TrainingConfig,
    initial: torch.nn.Module | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    device: torch.device | None = None,
) -> tuple[torch.nn.Module, TrainingReport]:
    """Train (or fine-tune `initial`) on `examples`, on the GPU with mixed precision when torch
    sees one, else on the CPU; returns the network on the CPU in eval mode."""
    roi = spec.inference.roi_size

    def patches(rng: np.random.Generator, network: torch.nn.Module) -> tuple[Any, Any]:
        picks = [examples[int(i)] for i in rng.integers(0, len(examples), config.batch_size)]
        chosen = [_patch(example, roi, rng) for example in picks]
        return torch.stack([p.image for p in chosen]), torch.stack([p.labels for p in chosen])

    return fit(
        initial if initial is not None else spec.network.build, patches, config, on_epoch, device
    )


def fit(
    network: torch.nn.Module | Callable[[], torch.nn.Module],
    batch: Batch,
    config: TrainingConfig,
    on_epoch: Callable[[int, float], None] | None = None,
    device: torch.device | None = None,
) -> tuple[torch.nn.Module, TrainingReport]:
    """Adam on Dice + cross-entropy over `config.epochs` × `config.steps_per_epoch` batches of
    (inputs, labels) that `batch(rng, network)` makes, on `network` or on the one a builder
    makes after the seed is set (so a new network's initial weights follow the seed too); the
    network comes back on the CPU in eval mode."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    network = (network if isinstance(network, torch.nn.Module) else network()).to(device)
    network.train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    report = TrainingReport(config)
    for epoch in range(config.epochs):
        total = 0.0
        for _ in range(config.steps_per_epoch):
            inputs, labels = batch(rng, network)
            inputs, labels = inputs.to(device), labels.to(device)
            network.train()
            optimiser.zero_grad()
            with torch.autocast(device_type=device.type, enabled=amp):
                loss = loss_fn(network(inputs), labels)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            total += float(loss.detach())
        report.epoch_losses.append(total / config.steps_per_epoch)
        if on_epoch is not None:
            on_epoch(epoch + 1, report.epoch_losses[-1])
    network.eval()
    return network.cpu(), report


def trainable(spec: ModelSpec, champion: torch.nn.Module | None) -> torch.nn.Module | None:
    """The champion's weights in a fresh (trainable, non-scripted) network of the spec."""
    if champion is None:
        return None
    network: torch.nn.Module = spec.network.build()
    network.load_state_dict(champion.state_dict())
    return network


def dice_per_volume(
    network: torch.nn.Module,
    volumes: Sequence[tuple[NDArray[Any], NDArray[Any], Sequence[float]]],
    spec: ModelSpec,
) -> list[dict[str, float]]:
    """Dice per label name of each (HU, labels, spacing) volume, at its own resolution
    (`agents.metrics.dice_per_label`: a label absent from prediction and truth scores 1.0)."""
    config = inference_config(spec)
    return [
        dice_per_label(segment(network, hu, spacing, config)[0], truth, spec)
        for hu, truth, spacing in volumes
    ]


def mean_dice(scores: Sequence[Mapping[str, float]], spec: ModelSpec) -> dict[str, float]:
    """Mean over volumes of `dice_per_volume` scores, per label name."""
    return {
        label.name: sum(score[label.name] for score in scores) / len(scores)
        for label in spec.labels
    }


def evaluate(
    network: torch.nn.Module,
    volumes: Sequence[tuple[NDArray[Any], NDArray[Any], Sequence[float]]],
    spec: ModelSpec,
) -> dict[str, float]:
    """Mean Dice per label name over (HU, labels, spacing) volumes."""
    return mean_dice(dice_per_volume(network, volumes, spec), spec)
