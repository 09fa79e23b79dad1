"""What a training run killed outright (SIGKILL, power loss) leaves behind, set right by the
training worker's ghost sweep as it ends a killed flow run (`flows.ghosts.set_right`), and
by the next run of its model before that run reads the champion (a killed `radloop train
--local` has no sweep; its row is ended by the stale-heartbeat check). What it left depends
on where it died:

* **mid-deploy, after the champion pointer moved** to its challenger (Triton serves it)
  and before MLflow heard: the challenger's MLflow version has no `triton_version` and is
  not aliased champion, so the next run took the served version for a starter and
  registered it a second time. `finish_interrupted_deploy` finishes that deploy instead —
  the pointer names the run that made the served version (`TritonRepository.serving_run`).
* **anywhere** (mid-epoch, mid-judging, mid-deploy): its MLflow run stays RUNNING for good;
  `close_abandoned_mlflow_runs` ends it KILLED.

A kill before the pointer moved leaves a candidate version in the repository, which the
next staging removes (`model_registry.deploy.StagedVersion`).
"""

from __future__ import annotations

import logging
from statistics import fmean

from sqlalchemy import select

from agents.retrain.runs import record_deploy
from model_registry.mlflow_registry import CHAMPION, Registry
from model_registry.repository import TritonRepository
from radloop.db import OutboxEvent, Store, TrainingRun, utcnow
from radloop.domain import TrainingState
from radloop.events import EventType

log = logging.getLogger(__name__)

# Runs looked at for an MLflow run left open: a killed run is noticed by the next run.
RECENT_RUNS = 10


def finish_interrupted_deploy(
    store: Store, registry: Registry, repository: TritonRepository, model: str
) -> int | None:
    """If the served champion is the challenger of a run that did not live to say so, say it
    now: its MLflow version tagged with the Triton version and aliased champion, its row
    promoted (the gate's decision, and why it was finished here), its model.promoted and
    model.deployed events, its MLflow run FINISHED. Returns that run's id, or None when there
    was nothing to do."""
    run_id = repository.serving_run(model)
    served = repository.champion(model)
    if run_id is None or served is None:
        return None
    with store.read() as session:
        row = session.get(TrainingRun, run_id)
        if row is None or row.state == TrainingState.PROMOTED.value:
            return None
        mlflow_version, mlflow_run_id = row.mlflow_version, row.mlflow_run_id
        parent, dice = row.parent_version, row.challenger_dice
    if mlflow_version is None:  # registered before any deploy: not a run's pointer
        log.warning(
            "%s: v%d names training run %d, which registered nothing", model, served, run_id
        )
        return None
    registry.tag(model, mlflow_version, "triton_version", served)
    registry.set_alias(model, CHAMPION, mlflow_version)
    decision = None
    if mlflow_run_id is not None:  # the gate's decision; the row's says how the run was ended
        mlflow_run = registry.client.get_run(mlflow_run_id)
        decision = mlflow_run.data.tags.get("radloop.decision")
        if mlflow_run.info.status == "RUNNING":
            registry.client.set_terminated(mlflow_run_id)
    with store.transaction() as session:
        row = session.get_one(TrainingRun, run_id, with_for_update=True)
        if row.state == TrainingState.PROMOTED.value:
            return None
        row.decision = (
            f"{decision or 'promoted'} (its process died as it deployed, after v{served} began "
            "to serve; radloop finished the deploy)"
        )
        row.state, row.triton_version = TrainingState.PROMOTED.value, served
        row.finished_at = row.finished_at or utcnow()
        deployed = session.scalars(
            select(OutboxEvent.payload).where(OutboxEvent.event == EventType.MODEL_DEPLOYED.value)
        )
        if not any(payload.get("training_run_id") == run_id for payload in deployed):
            mean = fmean(dice.values()) if dice else None
            record_deploy(session, model, run_id, mlflow_version, served, parent, mean)
    log.warning(
        "%s: training run %d was killed as it deployed v%d; its deploy is finished",
        model,
        run_id,
        served,
    )
    return run_id


def close_abandoned_mlflow_runs(store: Store, registry: Registry, model: str) -> list[str]:
    """End KILLED the MLflow runs that the model's recent ended runs left RUNNING (their
    process was killed outright). Returns their ids."""
    with store.read() as session:
        rows = session.execute(
            select(TrainingRun.mlflow_run_id)
            .where(
                TrainingRun.model_name == model,
                TrainingRun.state != TrainingState.RUNNING.value,
                TrainingRun.mlflow_run_id.is_not(None),
            )
            .order_by(TrainingRun.id.desc())
            .limit(RECENT_RUNS)
        ).all()
    closed = []
    for (mlflow_run_id,) in rows:
        if mlflow_run_id and registry.client.get_run(mlflow_run_id).info.status == "RUNNING":
            registry.client.set_terminated(mlflow_run_id, "KILLED")
            closed.append(mlflow_run_id)
    if closed:
        log.warning("%s: MLflow runs %s of killed training runs ended KILLED", model, closed)
    return closed
