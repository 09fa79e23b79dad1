"""Hot reload of a model version into Triton without dropping a request.

1. Triton loads the new version beside the champion (explicit load; the version policy keeps
   the two newest versions, so the champion is not reloaded); drafting keeps asking for the
   champion by number, so nothing it sends changes.
2. A real request to the new version (a window-sized volume) warms it up, and its answer must
   name that version.
3. The champion pointer moves (`serving.json`): the next draft asks for the new version. The
   old version stays loaded until the next deploy, so a request that read the old pointer an
   instant earlier is still answered, and a rollback to it is immediate.

Rollback to a version outside the two newest lists both versions explicitly (Triton then
reloads them, each serving until its replacement is ready).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from model_registry.inference import InferenceUnavailable, TritonBackend
from model_registry.repository import TritonRepository
from radloop.modelspec import ModelSpec
from radloop.wait import WaitTimeout, wait_until

log = logging.getLogger(__name__)


class DeployFailed(RuntimeError):
    """The new version did not load or did not answer as itself; the champion still serves."""


@dataclass(frozen=True)
class Deployment:
    model: str
    version: int
    previous: int | None
    load_seconds: float
    warmup_seconds: float
    total_seconds: float


def warmup_volume(spec: ModelSpec) -> tuple[NDArray[np.float32], Sequence[float]]:
    """A volume the size of the spec's sliding window, at its spacing: a real request."""
    rng = np.random.default_rng(0)
    shape = tuple(spec.inference.roi_size)
    window = spec.preprocessing.window
    volume = rng.uniform(window.min, window.max, size=shape).astype(np.float32)
    return volume, tuple(spec.preprocessing.spacing)


def hot_reload(
    repository: TritonRepository,
    backend: TritonBackend,
    spec: ModelSpec,
    version: int,
    *,
    ready_timeout: float = 300.0,
) -> Deployment:
    started = time.monotonic()
    name = spec.name
    previous = repository.champion(name)
    if previous == version:
        backend.load(name)
        return Deployment(name, version, previous, 0.0, 0.0, 0.0)
    newest = repository.versions(name)[-2:]
    if version in newest and (previous is None or previous in newest):
        repository.write_config(name)
    else:
        repository.write_config(name, [v for v in (previous, version) if v is not None])
    try:
        backend.load(name)
        try:
            wait_until(lambda: backend.ready(name, str(version)), ready_timeout, 0.2)
        except WaitTimeout:
            raise DeployFailed(
                f"{name} v{version} was not ready within {ready_timeout:.0f} s"
            ) from None
        loaded = time.monotonic()
        image, spacing = warmup_volume(spec)
        answer = backend.infer(name, image, spacing, version)
        if answer.model_version != str(version) or answer.labels.shape != image.shape:
            raise DeployFailed(
                f"{name} v{version} answered as v{answer.model_version} "
                f"with shape {answer.labels.shape}"
            )
    except (DeployFailed, InferenceUnavailable) as error:
        _restore(repository, backend, name, previous)
        raise DeployFailed(str(error)) from error
    warmed = time.monotonic()
    repository.set_champion(name, version)
    log.info("%s: drafting switched from v%s to v%d", name, previous, version)
    return Deployment(
        model=name,
        version=version,
        previous=previous,
        load_seconds=loaded - started,
        warmup_seconds=warmed - loaded,
        total_seconds=time.monotonic() - started,
    )


def _restore(
    repository: TritonRepository, backend: TritonBackend, name: str, previous: int | None
) -> None:
    """Back to serving only the champion, as before the attempt."""
    if previous is None:
        return
    repository.write_config(name, [previous])
    try:
        backend.load(name)
    except InferenceUnavailable as error:
        log.warning("%s: could not reload v%d after a failed deploy: %s", name, previous, error)
