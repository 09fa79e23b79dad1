"""A training run in a process of its own, as `radloop train --local` and a Prefect flow run
have one, for tests that signal or kill it: `python -m tests.training_process SPEC.json
[--triton]` retrains the spec'd model (trigger "manual") on the database and MLflow its
RADLOOP_* environment names; with `--triton` it stages and deploys in the Triton they name."""

from __future__ import annotations

import sys
from pathlib import Path

from agents.retrain import Retrainer
from model_registry.inference import TritonBackend
from model_registry.mlflow_registry import Registry
from model_registry.repository import TritonRepository
from radloop.db import Store
from radloop.domain import TrainingState, TrainingTrigger
from radloop.modelspec import ModelSpec
from radloop.settings import load_settings


def main(spec_path: str, *options: str) -> None:
    settings = load_settings()
    spec = ModelSpec.model_validate_json(Path(spec_path).read_text())
    store = Store.open(settings.effective_database_url)
    try:
        registry = Registry(settings.mlflow.effective_tracking_uri)
        repository = TritonRepository(settings.model_repository)
        backend = TritonBackend(settings.triton.base_url) if "--triton" in options else None
        retrainer = Retrainer(store, spec, registry, repository, backend)
        result = retrainer.run(TrainingTrigger.MANUAL)
    finally:
        store.close()
    sys.exit(0 if result["state"] != TrainingState.FAILED else 1)


if __name__ == "__main__":
    main(*sys.argv[1:])
