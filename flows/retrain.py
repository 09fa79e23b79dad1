"""Flow `retrain-model`: fine-tune, register, gate and hot-reload one model (or every model).

Thin on purpose: `agents.retrain.Retrainer` does the work, each run a `training_runs` row.
Deployed by `radloop worker --queue train` on its work pool, three ways, all one deployment
with a concurrency limit of 1 (runs that arrive while one trains wait, then find nothing new
and end at once — they coalesce): an event trigger on `radloop.label.validated` (trigger
"threshold"), a cron schedule ("schedule") and `radloop train` ("manual"). Each flow run is
its own process, so Triton keeps serving drafts while it trains.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from agents.retrain import Retrainer
from flows.ghosts import end_training_rows_on_crash
from flows.process import mark_this_run
from model_registry.repository import model_repository
from radloop.db import Store
from radloop.domain import RETRAIN_FLOW, TrainingTrigger
from radloop.modelspec import ModelSpec, load_specs
from radloop.settings import Settings, load_settings


def retrainable(
    specs: dict[str, ModelSpec], settings: Settings, model: str | None
) -> list[ModelSpec]:
    """The models `model` names (None: all): a task's own model, then its interactive model
    (named by the task's name too) once one serves — a site opts in with `radloop models
    bootstrap NAME --interactive` or an import; the loop does not train one from nothing."""
    repository = model_repository(settings)
    chosen = []
    for name, spec in specs.items():
        if model in (None, name):
            chosen.append(spec)
        if spec.interactive is None:
            continue
        interactive = spec.as_interactive()
        if model in (None, name, interactive.name) and repository.champion(interactive.name):
            chosen.append(interactive)
    return chosen


@flow(name=RETRAIN_FLOW, on_crashed=[end_training_rows_on_crash])
def retrain_model(model: str | None = None, trigger: str = "threshold") -> list[dict[str, Any]]:
    """Retrain `model` (every spec'd model when None) if `trigger` says it is due."""
    mark_this_run()
    settings = load_settings()
    specs = load_specs(settings.effective_models_dir)
    logger = get_run_logger()
    store = Store.open(settings.effective_database_url)
    results = []
    try:
        for spec in retrainable(specs, settings, model):
            name = spec.name
            retrainer = Retrainer.from_settings(store, spec, settings)

            def progress(
                epoch: int, loss: float, name: str = name, epochs: int = spec.retraining.epochs
            ) -> None:
                logger.info("%s epoch %d/%d loss %.4f", name, epoch, epochs, loss)

            result = retrainer.run(TrainingTrigger(trigger), on_epoch=progress)
            logger.info("%s: %s", name, result.get("decision"))
            results.append(result)
    finally:
        store.close()
    return results
