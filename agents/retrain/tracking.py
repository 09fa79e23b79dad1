"""The MLflow side of a training run: its parameters and dataset manifest, and the trained
model as the run's artifact, registered as a new version with alias challenger."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from model_registry.mlflow_registry import CHALLENGER, Registry
from radloop.modelspec import ModelSpec


def training_params(
    spec: ModelSpec,
    train_labels: int,
    holdout_labels: int,
    parent: int | None,
    strategies: dict[str, int],
) -> dict[str, Any]:
    """What the run trained with, as MLflow parameters (and the model card's): among them the
    active-learning strategies that selected its labels, with counts."""
    retraining = spec.retraining
    return {
        "model": spec.name,
        "network": spec.network.name,
        "epochs": retraining.epochs,
        "steps_per_epoch": retraining.steps_per_epoch,
        "batch_size": retraining.batch_size,
        "learning_rate": retraining.learning_rate,
        "seed": retraining.seed,
        "train_labels": train_labels,
        "holdout_labels": holdout_labels,
        "parent_triton_version": parent if parent is not None else "none",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gate_margin": retraining.gate_margin,
        # e.g. "entropy:4,urgent:1": how the train labels were picked for their readers.
        "selected_by": ",".join(f"{k}:{n}" for k, n in strategies.items()) or "none",
    }


def create_run(registry: Registry, spec: ModelSpec, training_run: int, reason: str) -> str:
    """A new MLflow run in the model's experiment; returns its id."""
    created = registry.client.create_run(
        registry.experiment_id(spec.name),
        run_name=f"{spec.name}-run{training_run}",
        tags={"radloop.training_run": str(training_run), "radloop.trigger": reason},
    )
    return str(created.info.run_id)


def log_inputs(
    registry: Registry, mlflow_run: str, params: dict[str, Any], dataset: dict[str, Any]
) -> None:
    for key, value in params.items():
        registry.client.log_param(mlflow_run, key, value)
    registry.client.log_dict(mlflow_run, dataset, "dataset_manifest.json")


def register_model(
    registry: Registry,
    spec: ModelSpec,
    mlflow_run: str,
    training_run: int,
    scripted: torch.jit.ScriptModule,
    card: str,
    holdout_dice: float | None,
) -> str:
    """The TorchScript model, spec and card as the run's artifact `model`, registered as a
    new MLflow version with alias challenger. Returns the version."""
    client = registry.client
    with tempfile.TemporaryDirectory() as folder:
        artifact = Path(folder) / "model"
        artifact.mkdir()
        torch.jit.save(scripted, str(artifact / "model.pt"))
        (artifact / "spec.json").write_text(spec.model_dump_json(indent=2))
        (artifact / "README.md").write_text(card)
        client.log_artifacts(mlflow_run, str(artifact), "model")
    source = f"{client.get_run(mlflow_run).info.artifact_uri}/model"
    version = registry.register(
        spec.name,
        mlflow_run,
        source,
        {
            "radloop.training_run": str(training_run),
            "holdout_dice": f"{holdout_dice:.4f}" if holdout_dice is not None else "",
        },
    )
    registry.set_alias(spec.name, CHALLENGER, version)
    return version
