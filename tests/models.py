"""Model versions for tests: untrained but seeded, so every run serves the same weights."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from model_registry.repository import model_repository
from radloop.modelspec import PACKAGED_MODELS, ModelSpec, load_spec
from radloop.settings import Settings


def scripted_network(spec: ModelSpec, seed: int = 0) -> torch.jit.ScriptModule:
    torch.manual_seed(seed)
    return torch.jit.script(spec.network.build().eval())  # type: ignore[no-any-return]


def write_retraining_spec(folder: Path, **retraining: float) -> ModelSpec:
    """The packaged phantom-abdomen spec with its `retraining` settings changed, written into
    `folder` (a models dir: the training flow reads specs per run); returns it."""
    spec = yaml.safe_load((PACKAGED_MODELS / "phantom-abdomen.yaml").read_text())
    spec["retraining"].update(retraining)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "phantom-abdomen.yaml").write_text(yaml.safe_dump(spec))
    return load_spec(folder / "phantom-abdomen.yaml")


def export_version(settings: Settings, spec: ModelSpec, seed: int = 0) -> int:
    """Add a version of `spec`'s model to the test's repository; return its number."""
    return model_repository(settings).export(spec, scripted_network(spec, seed))


def small_interactive(spec: ModelSpec) -> ModelSpec:
    """`spec` with a small interactive model (8–32 channels on a 32×48×48 grid): it trains in
    seconds and learns enough to follow a click; the served spec's own is for `bootstrap`."""
    assert spec.interactive is not None
    network = spec.interactive.network.model_copy(
        update={"args": {**spec.interactive.network.args, "channels": [8, 16, 32]}}
    )
    network = network.model_copy(update={"args": {**network.args, "strides": [2, 2]}})
    interactive = spec.interactive.model_copy(
        update={"network": network, "spatial_size": (32, 48, 48), "sigma": 2.0}
    )
    return spec.model_copy(update={"interactive": interactive})


def export_interactive(settings: Settings, spec: ModelSpec, steps: int = 40) -> int:
    """Train `small_interactive(spec)` on phantoms with simulated clicks and add it as a
    version of the spec's interactive model; return its number."""
    from agents.interactive import InteractiveExample, train_interactive
    from radloop.app.phantoms import generate

    small = small_interactive(spec)
    examples = [InteractiveExample(p.hu, p.labels) for p in map(generate, range(700, 704))]
    network, _ = train_interactive(small, examples, seed=0, steps=steps)
    scripted = torch.jit.script(network.eval())
    return model_repository(settings).export(small.as_interactive(), scripted)
