"""Inference backends behind one small protocol: Triton for the product, in-process for tests.

Both run `model_registry/triton_model`'s `segment`, so a unit test and the served model
compute the same thing.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tritonclient.http as triton_http
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException


class InferenceUnavailable(RuntimeError):
    """The server could not be reached or refused the request; retrying later may work."""


@dataclass(frozen=True)
class InferenceResult:
    labels: NDArray[Any]  # uint8, the input's shape
    uncertainty: float  # the spec's uncertainty method
    model_version: str
    # Every uncertainty score the model computed (entropy always), and the study's embedding
    # (empty for an interactive model): what the active-learning strategies rank on.
    scores: dict[str, float] = field(default_factory=dict)
    embedding: NDArray[Any] = field(default_factory=lambda: np.zeros(0, np.float32))


class InferenceBackend(Protocol):
    def infer(
        self, model: str, image: NDArray[Any], spacing: Sequence[float], version: int | None = None
    ) -> InferenceResult:
        """Label map and uncertainty for one volume (float32 HU, slices × rows × columns),
        from `version` (default: whichever the server picks)."""
        ...


def _host_port(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


# The order of Triton's SCORES output: `triton_model.model.SCORE_NAMES`, repeated here because
# that module imports torch and this one is imported by processes that need none.
SCORE_NAMES = ("entropy", "mc_dropout", "flip_tta")


def _named_scores(values: NDArray[Any] | None) -> dict[str, float]:
    """SCORES (NaN: not computed) by name."""
    if values is None:
        return {}
    return {
        name: float(value)
        for name, value in zip(SCORE_NAMES, values.tolist(), strict=False)
        if not np.isnan(value)
    }


class TritonBackend:
    """Triton over HTTP (tritonclient). Models are loaded explicitly, never by polling."""

    def __init__(self, url: str, timeout_seconds: float = 300.0) -> None:
        self.url = _host_port(url)
        self.timeout_seconds = timeout_seconds
        self._local = threading.local()

    @property
    def client(self) -> triton_http.InferenceServerClient:
        """This thread's client: tritonclient's HTTP client must not be shared between
        threads (a worker drafts several studies at once)."""
        client: triton_http.InferenceServerClient | None = getattr(self._local, "client", None)
        if client is None:
            client = triton_http.InferenceServerClient(
                self.url, connection_timeout=10.0, network_timeout=self.timeout_seconds
            )
            self._local.client = client
        return client

    def infer(
        self, model: str, image: NDArray[Any], spacing: Sequence[float], version: int | None = None
    ) -> InferenceResult:
        return self._infer(model, image, spacing, version, {}, ("SCORES", "EMBEDDING"))

    def refine(
        self,
        model: str,
        image: NDArray[Any],
        spacing: Sequence[float],
        clicks: NDArray[Any],
        previous: NDArray[Any] | None,
        version: int | None = None,
    ) -> InferenceResult:
        """An interactive model's label map for `clicks` (n × 4: channel, slice, row,
        column) on `previous` (None: an empty label)."""
        extra = {"CLICKS": np.asarray(clicks, dtype=np.int32).reshape(-1, 4)}
        if previous is not None:
            extra["PREVIOUS"] = np.ascontiguousarray(previous, dtype=np.uint8)
        return self._infer(model, image, spacing, version, extra, ())

    def _infer(
        self,
        model: str,
        image: NDArray[Any],
        spacing: Sequence[float],
        version: int | None,
        extra: dict[str, NDArray[Any]],
        selection: tuple[str, ...],
    ) -> InferenceResult:
        volume = np.ascontiguousarray(image, dtype=np.float32)
        arrays = {"IMAGE": volume, "SPACING": np.asarray(spacing, dtype=np.float32), **extra}
        types = {"IMAGE": "FP32", "SPACING": "FP32", "CLICKS": "INT32", "PREVIOUS": "UINT8"}
        inputs = []
        for name, array in arrays.items():
            tensor = triton_http.InferInput(name, list(array.shape), types[name])
            tensor.set_data_from_numpy(array, binary_data=True)
            inputs.append(tensor)
        outputs = [
            triton_http.InferRequestedOutput(name, binary_data=True)
            for name in ("LABELS", "UNCERTAINTY", "MODEL_VERSION", *selection)
        ]
        try:
            result = self.client.infer(
                model,
                inputs,
                model_version="" if version is None else str(version),
                outputs=outputs,
            )
        except (InferenceServerException, OSError) as error:
            raise InferenceUnavailable(f"Triton inference of {model} failed: {error}") from error
        answered = result.as_numpy("MODEL_VERSION")
        labels = result.as_numpy("LABELS")
        score = result.as_numpy("UNCERTAINTY")
        if labels is None or score is None or answered is None:
            raise InferenceUnavailable(
                f"Triton's answer for {model} lacks LABELS, UNCERTAINTY or MODEL_VERSION"
            )
        raw = answered[0]
        scores = result.as_numpy("SCORES") if "SCORES" in selection else None
        embedding = result.as_numpy("EMBEDDING") if "EMBEDDING" in selection else None
        return InferenceResult(
            labels=labels,
            uncertainty=float(score[0]),
            model_version=raw.decode() if isinstance(raw, bytes) else str(raw),
            scores=_named_scores(scores),
            embedding=np.zeros(0, np.float32) if embedding is None else embedding,
        )

    def load(self, model: str) -> None:
        """Load (or reload: swap to the newest version of) `model`."""
        try:
            self.client.load_model(model)
        except (InferenceServerException, OSError) as error:
            raise InferenceUnavailable(f"Triton could not load {model}: {error}") from error

    def ready(self, model: str, version: str = "") -> bool:
        try:
            return bool(self.client.is_model_ready(model, version))
        except (InferenceServerException, OSError):
            return False

    def served_versions(self, model: str) -> list[str]:
        """Versions of `model` Triton reports READY."""
        try:
            index: list[dict[str, Any]] = self.client.get_model_repository_index()
        except (InferenceServerException, OSError) as error:
            raise InferenceUnavailable(f"Triton unreachable: {error}") from error
        return [
            str(entry.get("version"))
            for entry in index
            if entry.get("name") == model and entry.get("state") == "READY"
        ]


class InProcessBackend:
    """Runs a repository version in this process. For unit tests only: the product serves
    through Triton."""

    def __init__(self, repository: Path) -> None:
        from model_registry.repository import TritonRepository

        self.repository = TritonRepository(repository)
        self._loaded: dict[str, tuple[str, Any, dict[str, Any]]] = {}

    def infer(
        self, model: str, image: NDArray[Any], spacing: Sequence[float], version: int | None = None
    ) -> InferenceResult:
        from model_registry.triton_model.drafting import analyse

        served, network, config = self._network(model, version)
        answer = analyse(network, image, spacing, config)
        return InferenceResult(
            labels=answer.labels,
            uncertainty=answer.score,
            model_version=served,
            scores=answer.scores,
            embedding=answer.embedding,
        )

    def refine(
        self,
        model: str,
        image: NDArray[Any],
        spacing: Sequence[float],
        clicks: NDArray[Any],
        previous: NDArray[Any] | None,
        version: int | None = None,
    ) -> InferenceResult:
        from model_registry.triton_model.clicks import refine

        served, network, config = self._network(model, version)
        labels = refine(network, image, clicks, previous, config)
        return InferenceResult(labels=labels, uncertainty=0.0, model_version=served)

    def _network(self, model: str, version: int | None) -> tuple[str, Any, dict[str, Any]]:
        import torch

        from model_registry.triton_model.model import load

        if version is None:
            version = self.repository.champion(model)
        if version is None:
            raise InferenceUnavailable(f"no version of {model} in {self.repository.store.url()}")
        if model not in self._loaded or self._loaded[model][0] != str(version):
            with self.repository.version_folder(model, version) as folder:
                network, config = load(folder, torch.device("cpu"))
            self._loaded[model] = (str(version), network, config)
        return self._loaded[model]
