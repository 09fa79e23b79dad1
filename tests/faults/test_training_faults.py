"""The process training a model killed outright (kill -9, as the OOM killer or a power cut
does; `test_retrain.py` covers SIGTERM and Prefect's cancellation, which let it end itself),
against real MLflow and Triton:

1. mid-epoch;
2. mid-deploy: the champion pointer has moved to its challenger — Triton drafts with it —
   and MLflow has not yet been told (the kill lands as the trainer sends MLflow the version's
   Triton number).

The next run of the model finds it all ended and set right, and runs to a decision: no
version registered twice, every MLflow run closed, the killed deploy finished (alias,
events, row), nothing stuck RUNNING."""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from agents.retrain import Retrainer
from model_registry.inference import TritonBackend
from model_registry.mlflow_registry import CHALLENGER, CHAMPION, Registry
from model_registry.repository import model_repository
from radloop.app.supervisor import Child
from radloop.db import Store, TrainingRun
from radloop.domain import TrainingState, TrainingTrigger
from radloop.modelspec import ModelSpec
from radloop.settings import Settings
from radloop.wait import wait_until
from tests.conftest_marks import ONCE
from tests.models import export_version
from tests.proxy import CuttingProxy
from tests.test_retrain import _spec, events, validate_studies

# Trains a model (epochs of one step) in processes of its own against MLflow and Triton.
pytestmark = pytest.mark.slow


def rows(store: Store) -> list[TrainingRun]:
    with store.read() as session:
        found = list(session.scalars(select(TrainingRun).order_by(TrainingRun.id)))
        session.expunge_all()
        return found


def age_heartbeats(store: Store) -> None:
    """Shortcut: a killed `radloop train --local` run is ended by the next start once its
    heartbeat is `STALE_AFTER` (30 min) old; rather than wait, its heartbeat is made that old.
    (A Prefect flow run's process is ended by the training worker's ghost sweep instead, as
    `test_up_lifecycle.py` shows.)"""
    with store.transaction() as session:
        for row in session.scalars(
            select(TrainingRun).where(TrainingRun.state == TrainingState.RUNNING.value)
        ):
            row.heartbeat_at -= timedelta(hours=1)


def training(spec: ModelSpec, env: dict[str, str], tmp_path: Path) -> subprocess.Popen[bytes]:
    """`spec`'s retraining in a process of its own, staging and deploying in Triton."""
    path = tmp_path / f"spec-{spec.retraining.epochs}.json"
    path.write_text(spec.model_dump_json())
    command = [sys.executable, "-m", "tests.training_process", str(path), "--triton"]
    return subprocess.Popen(command, env=env)


@ONCE  # training, MLflow and Triton: nothing database-specific
@pytest.mark.timeout(600)
def test_a_training_killed_mid_epoch_or_mid_deploy_is_ended_set_right_and_the_next_runs(
    radloop_env: dict[str, str],
    settings: Settings,
    store: Store,
    mlflow_server: Child,
    triton: Child,
    tmp_path: Path,
) -> None:
    spec = _spec(threshold=1, epochs=1, steps_per_epoch=1, gate_margin=1.0)  # always promoted
    repository = model_repository(settings)
    export_version(settings, spec)  # the starter, v1: the first run adopts it into MLflow
    backend = TritonBackend(triton.spec.url)
    backend.load(spec.name)
    # Validated in order: the 1st to the holdout, the others to training.
    validate_studies(settings, store, spec, tmp_path, [61, 62, 63], lambda _, truth: truth)
    registry = Registry(mlflow_server.spec.url)

    # 1. Killed mid-epoch: nothing can end its row or its MLflow run.
    endless = spec.model_copy(
        update={"retraining": spec.retraining.model_copy(update={"epochs": 1000})}
    )
    child = training(endless, radloop_env, tmp_path)
    try:
        wait_until(lambda: rows(store) and rows(store)[-1].epoch >= 1, timeout=300, interval=0.2)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    (mid_epoch,) = rows(store)
    assert mid_epoch.state == TrainingState.RUNNING and mid_epoch.mlflow_run_id is not None
    assert registry.client.get_run(mid_epoch.mlflow_run_id).info.status == "RUNNING"
    age_heartbeats(store)

    # 2. Killed mid-deploy: the first MLflow request after the pointer moved is never sent.
    def pointer_moved(method: str, path: str, status: int) -> bool:
        return repository.champion(spec.name) == 2

    killed: list[subprocess.Popen[bytes]] = []
    proxy = CuttingProxy(
        mlflow_server.spec.url, pointer_moved, then=lambda: killed[0].kill(), before=True
    ).start()
    env = {**radloop_env, "RADLOOP_MLFLOW__TRACKING_URI": proxy.url}
    child = training(spec, env, tmp_path)
    killed.append(child)
    try:
        wait_until(proxy.cut.is_set, timeout=300, interval=0.2)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        proxy.stop()
        if child.poll() is None:
            child.kill()
    mid_deploy = rows(store)[-1]
    assert mid_deploy.state == TrainingState.RUNNING and mid_deploy.mlflow_version == "2"
    assert (
        repository.champion(spec.name) == 2 and repository.serving_run(spec.name) == mid_deploy.id
    )
    unfinished = registry.versions(spec.name)
    assert [(v.aliases, v.triton_version) for v in unfinished] == [
        ([CHAMPION], 1),
        ([CHALLENGER], None),
    ]
    age_heartbeats(store)

    # 3. The next run: the killed runs ended, the deploy finished, and a decision.
    retrainer = Retrainer(store, spec, registry, repository, backend)
    result = retrainer.run(TrainingTrigger.MANUAL)
    assert result["state"] == TrainingState.PROMOTED, result
    first, second, third = rows(store)
    assert (first.state, first.decision) == (TrainingState.FAILED, "no heartbeat: process killed")
    assert second.state == TrainingState.PROMOTED and second.triton_version == 2
    assert second.decision is not None and second.decision.startswith("promoted")
    assert "radloop finished the deploy" in second.decision
    assert (third.id, third.parent_version, third.triton_version) == (
        result["training_run_id"],
        2,
        3,
    )

    def status(row: TrainingRun) -> str:
        assert row.mlflow_run_id is not None
        return str(registry.client.get_run(row.mlflow_run_id).info.status)

    assert [status(r) for r in (first, second, third)] == ["KILLED", "FINISHED", "FINISHED"]
    # Each network registered once — the killed run's was not adopted again as a "starter".
    versions = registry.versions(spec.name)
    assert [(v.version, v.triton_version, v.run_id) for v in versions] == [
        ("1", 1, versions[0].run_id),
        ("2", 2, second.mlflow_run_id),
        ("3", 3, third.mlflow_run_id),
    ]
    assert [CHAMPION in v.aliases for v in versions] == [False, False, True]
    deployed: list[dict[str, Any]] = events(store, "radloop.model.deployed")
    assert [
        (e["training_run_id"], e["previous_triton_version"], e["triton_version"]) for e in deployed
    ] == [
        (second.id, 1, 2),
        (third.id, 2, 3),
    ]
    assert len(events(store, "radloop.model.promoted")) == 2
    assert repository.champion(spec.name) == 3 and "3" in backend.served_versions(spec.name)
    assert all(row.state != TrainingState.RUNNING for row in rows(store))
