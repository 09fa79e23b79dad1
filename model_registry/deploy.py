"""Hot reload of a model version into Triton without dropping a request.

1. Triton loads the new version beside the champion (explicit load; the version policy keeps
   the two newest versions, so the champion is not reloaded); drafting keeps asking for the
   champion by number, so nothing it sends changes.
2. A real request to the new version (a window-sized volume) warms it up, and its answer must
   name that version.
3. The champion pointer moves (`serving.json`): the next draft asks for the new version. The
   old version stays loaded until the next deploy, so a request that read the old pointer an
   instant earlier is still answered, and a rollback to it is immediate.

`hot_reload` runs the three steps in turn (a rollback, a version already judged).
`StagedVersion` runs steps 1 and 2 in a background thread while the retraining gate judges
the version, and step 3 only if the gate promotes it; a rejected version is withdrawn —
removed from the repository and unloaded — without ever having been asked for. The pointer
records it as a candidate first, so one left behind by a killed run is removed by the next
staging.

Rollback to a version outside the two newest lists both versions explicitly (Triton then
reloads them, each serving until its replacement is ready).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from model_registry.inference import InferenceUnavailable, TritonBackend
from model_registry.repository import TritonRepository
from radloop.modelspec import ModelSpec
from radloop.wait import WaitTimeout, wait_until

if TYPE_CHECKING:
    import torch

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


def _load_beside(
    repository: TritonRepository,
    backend: TritonBackend,
    spec: ModelSpec,
    version: int,
    previous: int | None,
    ready_timeout: float,
) -> tuple[float, float]:
    """Steps 1 and 2: `version` loaded beside `previous` and answering as itself. Returns the
    seconds to READY and of the warm-up; raises DeployFailed or InferenceUnavailable."""
    started = time.monotonic()
    name = spec.name
    newest = repository.versions(name)[-2:]
    if version in newest and (previous is None or previous in newest):
        repository.write_config(name)
    else:
        repository.write_config(name, [v for v in (previous, version) if v is not None])
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
    return loaded - started, time.monotonic() - loaded


def hot_reload(
    repository: TritonRepository,
    backend: TritonBackend,
    spec: ModelSpec,
    version: int,
    *,
    ready_timeout: float = 300.0,
    training_run: int | None = None,
) -> Deployment:
    """Serve `version` (a new one, or a rollback): steps 1 to 3 in turn. On DeployFailed the
    champion alone is loaded again and still serves. `training_run`: the run that made
    `version`, recorded with the pointer (`TritonRepository.set_champion`)."""
    started = time.monotonic()
    name = spec.name
    previous = repository.champion(name)
    if previous == version:
        backend.load(name)
        return Deployment(name, version, previous, 0.0, 0.0, 0.0)
    try:
        load_s, warmup_s = _load_beside(repository, backend, spec, version, previous, ready_timeout)
    except (DeployFailed, InferenceUnavailable) as error:
        _restore(repository, backend, name, previous)
        raise DeployFailed(str(error)) from error
    repository.set_champion(name, version, training_run)
    log.info("%s: drafting switched from v%s to v%d", name, previous, version)
    return Deployment(name, version, previous, load_s, warmup_s, time.monotonic() - started)


class StagedVersion:
    """A new version written beside the champion and loaded and warmed up in Triton by a
    background thread, while the caller decides whether it may serve (the retraining gate).
    Until `promote` moves the pointer nothing asks for it: drafting asks for the champion by
    number, and the pointer pins the champion before the version exists. `withdraw` unloads
    it and removes its folder.

    The thread talks to Triton through its own client (`TritonBackend.clone`) and is the only
    writer of the repository's `config.pbtxt` until `promote` or `withdraw` joins it; call one
    of them once (a second `withdraw`, or a `withdraw` after `promote`, does nothing)."""

    def __init__(
        self,
        repository: TritonRepository,
        backend: TritonBackend,
        spec: ModelSpec,
        model: torch.jit.ScriptModule,
        *,
        ready_timeout: float = 300.0,
    ) -> None:
        name = spec.name
        self.repository, self.backend, self.spec = repository, backend, spec
        self.previous = repository.champion(name)
        if self.previous is None:
            raise ValueError(f"{name}: nothing to stage beside (no champion)")
        self._started = time.monotonic()
        stale = repository.candidate(name)
        if stale is not None and stale != self.previous:  # its run was killed before the gate
            repository.remove_version(name, stale)
            log.warning("%s: removed v%d, a candidate never judged", name, stale)
            _unload_removed(backend, name)
        self._config = repository.config_text(name)
        versions = repository.versions(name)
        self.version = versions[-1] + 1
        repository.mark_candidate(name, self.version)
        repository.export(spec, model, self.version, serve=False)
        self._ready_timeout = ready_timeout
        self._loaded: tuple[float, float] | None = None
        self._error: Exception | None = None
        self._settled = False
        self._thread = threading.Thread(
            target=self._load, name=f"stage-{name}-v{self.version}", daemon=True
        )
        self._thread.start()

    def _load(self) -> None:
        try:
            self._loaded = _load_beside(
                self.repository,
                self.backend,  # each thread gets its own tritonclient client
                self.spec,
                self.version,
                self.previous,
                self._ready_timeout,
            )
        except Exception as error:  # handed to promote(), which raises it as DeployFailed
            self._error = error

    def promote(self, training_run: int | None = None) -> Deployment:
        """Wait for the load; move the pointer if the version answered as itself (recording
        `training_run`, the run that made it). Otherwise withdraw it (the champion still
        serves) and raise DeployFailed."""
        if self._settled:
            raise RuntimeError(f"{self.spec.name} v{self.version} was already settled")
        self._thread.join()
        name = self.spec.name
        if self._loaded is None:
            self.withdraw()
            raise DeployFailed(f"{name} v{self.version}: {self._error}") from self._error
        self.repository.set_champion(name, self.version, training_run)
        self._settled = True
        log.info("%s: drafting switched from v%s to v%d", name, self.previous, self.version)
        load_s, warmup_s = self._loaded
        return Deployment(
            name, self.version, self.previous, load_s, warmup_s, time.monotonic() - self._started
        )

    def withdraw(self) -> None:
        """Wait for the load, then take the version out of the repository and out of Triton
        (the configuration as before staging, explicit load); the champion keeps serving.
        Does nothing once promoted or withdrawn."""
        if self._settled:
            return
        self._thread.join()
        name = self.spec.name
        self.repository.remove_version(name, self.version)
        self._settled = True
        if self._config is not None:
            self.repository.restore_config(name, self._config)
        _unload_removed(self.backend, name)
        log.info("%s: candidate v%d withdrawn, v%s serves", name, self.version, self.previous)

    def withdraw_quietly(self) -> None:
        """`withdraw` on the way out of a failed or cancelled run: an error here is logged,
        not raised, so it does not hide why the run ended."""
        try:
            self.withdraw()
        except Exception:
            log.exception("%s: could not withdraw candidate v%d", self.spec.name, self.version)


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


def _unload_removed(backend: TritonBackend, name: str) -> None:
    """An explicit load after a version folder was removed: Triton unloads that version (and
    loads what the policy lists instead). Drafting never asks for a removed version, so
    a Triton that does not answer now only keeps it in memory until its next load."""
    try:
        backend.load(name)
    except InferenceUnavailable as error:
        log.warning("%s: Triton did not reload after a version was removed: %s", name, error)
