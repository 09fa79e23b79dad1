"""Model versions for tests: untrained but seeded, so every run serves the same weights."""

from __future__ import annotations

import torch

from model_registry.repository import model_repository
from radloop.modelspec import ModelSpec
from radloop.settings import Settings


def scripted_network(spec: ModelSpec, seed: int = 0) -> torch.jit.ScriptModule:
    torch.manual_seed(seed)
    return torch.jit.script(spec.network.build().eval())  # type: ignore[no-any-return]


def export_version(settings: Settings, spec: ModelSpec, seed: int = 0) -> int:
    """Add a version of `spec`'s model to the test's repository; return its number."""
    return model_repository(settings).export(spec, scripted_network(spec, seed))
