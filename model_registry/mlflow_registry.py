"""MLflow as radloop's tracking and registry: one run per training, one registered version per
trained network, aliases `champion` and `challenger`, and the Triton version each MLflow version
is served as (tag `triton_version`).

Only internal ids and DICOM UIDs go into MLflow: never patient names, IDs or dates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"


class RegistryUnavailable(RuntimeError):
    """MLflow could not be reached or refused the request."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    aliases: list[str]
    triton_version: int | None
    holdout_dice: float | None
    run_id: str | None


class Registry:
    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def reachable(self, timeout: float = 2.0) -> bool:
        """Whether the tracking server answers now. MLflow's client retries a refused
        connection for minutes; callers that can go on without MLflow ask this first."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return True
        try:
            return httpx.get(f"{self.tracking_uri.rstrip('/')}/health", timeout=timeout).is_success
        except httpx.HTTPError:
            return False

    def experiment_id(self, model: str) -> str:
        name = f"radloop/{model}"
        try:
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                return str(found.experiment_id)
            return str(self.client.create_experiment(name, tags={"radloop.model": model}))
        except MlflowException as error:
            raise RegistryUnavailable(f"MLflow at {self.tracking_uri}: {error}") from error

    def register(self, model: str, run_id: str, artifact_uri: str, tags: dict[str, str]) -> str:
        """The registered version of `model` made from run `run_id`'s artifact (created unless
        the run has one); returns its number.

        One version per run. MLflow's client sends a request again when its answer was lost,
        POSTs included: MLflow killed after it committed a version, then back, gets the same
        create again and registers the run twice. The later twin is deleted here.
        """
        try:
            try:
                self.client.get_registered_model(model)
            except RestException:
                self.client.create_registered_model(
                    model, description=f"radloop segmentation model {model}"
                )
            made = self._versions_of_run(model, run_id)
            if not made:
                self.client.create_model_version(
                    model, source=artifact_uri, run_id=run_id, tags=tags
                )
                made = self._versions_of_run(model, run_id)
            kept, *twins = made
            for twin in twins:
                log.warning("%s: version %s registers run %s again; deleted", model, twin, run_id)
                self.client.delete_model_version(model, twin)
        except MlflowException as error:
            raise RegistryUnavailable(f"MLflow at {self.tracking_uri}: {error}") from error
        return kept

    def _versions_of_run(self, model: str, run_id: str) -> list[str]:
        found = self.client.search_model_versions(f"name = '{model}' and run_id = '{run_id}'")
        return sorted((str(v.version) for v in found), key=int)

    def set_alias(self, model: str, alias: str, version: str) -> None:
        try:
            self.client.set_registered_model_alias(model, alias, version)
        except MlflowException as error:
            raise RegistryUnavailable(f"MLflow at {self.tracking_uri}: {error}") from error

    def tag(self, model: str, version: str, key: str, value: Any) -> None:
        try:
            self.client.set_model_version_tag(model, version, key, str(value))
        except MlflowException as error:
            raise RegistryUnavailable(f"MLflow at {self.tracking_uri}: {error}") from error

    def alias(self, model: str, alias: str) -> RegisteredVersion | None:
        try:
            found = self.client.get_model_version_by_alias(model, alias)
        except RestException:
            return None
        except MlflowException as error:
            raise RegistryUnavailable(f"MLflow at {self.tracking_uri}: {error}") from error
        return _registered(found)

    def versions(self, model: str) -> list[RegisteredVersion]:
        try:
            found = self.client.search_model_versions(f"name = '{model}'")
            # Search results carry no aliases; the registered model lists them.
            aliases = self.client.get_registered_model(model).aliases if found else {}
        except RestException:
            return []
        except MlflowException as error:
            raise RegistryUnavailable(f"MLflow at {self.tracking_uri}: {error}") from error
        by_version: dict[str, list[str]] = {}
        for alias, version in (aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        return sorted(
            (_registered(v, by_version.get(str(v.version), [])) for v in found),
            key=lambda v: int(v.version),
        )

    def by_triton_version(self, model: str, triton_version: int) -> RegisteredVersion | None:
        for version in self.versions(model):
            if version.triton_version == triton_version:
                return version
        return None


def _registered(version: ModelVersion, aliases: list[str] | None = None) -> RegisteredVersion:
    tags = version.tags or {}
    triton = tags.get("triton_version")
    dice = tags.get("holdout_dice")
    return RegisteredVersion(
        name=version.name,
        version=str(version.version),
        aliases=sorted(aliases if aliases is not None else version.aliases or []),
        triton_version=int(triton) if triton and triton.isdigit() else None,
        holdout_dice=float(dice) if dice else None,
        run_id=version.run_id,
    )


def adopt(registry: Registry, model: str, version_dir: Path, triton_version: int, note: str) -> str:
    """Register a Triton version that was made outside a training run (a starter model, an
    imported one) as an MLflow version with alias `champion`; returns its MLflow version.
    Idempotent: a version already registered for `triton_version` is returned as it is."""
    found = registry.by_triton_version(model, triton_version)
    if found is not None:
        return found.version
    client = registry.client
    run = client.create_run(
        registry.experiment_id(model),
        run_name=f"{model}-v{triton_version}-adopted",
        tags={"radloop.origin": note},
    )
    run_id = run.info.run_id
    client.log_param(run_id, "origin", note)
    client.log_param(run_id, "triton_version", triton_version)
    client.log_artifacts(run_id, str(version_dir), "model")
    client.set_terminated(run_id)
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    version = registry.register(model, run_id, source, {"triton_version": str(triton_version)})
    registry.set_alias(model, CHAMPION, version)
    return version
