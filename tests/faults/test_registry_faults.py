"""MLflow killed (kill -9) mid-registration, at the worst moment: it has created the challenger's
model version and dies before the trainer hears so; it is started again seconds later. MLflow's
client sends the request again once the server answers — which, unguarded, registers the run
twice. The run still ends decided, with one registered version, served, and its MLflow run
closed."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agents.retrain import Retrainer
from model_registry.mlflow_registry import CHAMPION, Registry
from model_registry.repository import model_repository
from radloop.app.supervisor import Child
from radloop.db import Store
from radloop.domain import TrainingState
from radloop.settings import Settings
from radloop.wait import wait_until
from tests.conftest_marks import ONCE, STACK
from tests.models import export_version
from tests.proxy import CuttingProxy
from tests.test_retrain import _spec, validate_studies

# Trains a model (one short epoch) against a real MLflow.
pytestmark = [pytest.mark.slow, STACK]


@ONCE  # training and MLflow: nothing database-specific
def test_mlflow_killed_as_it_registers_the_challenger_leaves_one_version_and_a_decided_run(
    settings: Settings, store: Store, mlflow_server: Child, tmp_path: Path
) -> None:
    spec = _spec(threshold=1, epochs=1, steps_per_epoch=1, gate_margin=1.0)
    export_version(settings, spec)  # the champion: the run adopts it into MLflow first
    # Validated in order: the 1st to the holdout, the others to training.
    validate_studies(settings, store, spec, tmp_path, [91, 92, 93], lambda _, truth: truth)

    creates = 0

    def challengers_version_created(method: str, path: str, status: int) -> bool:
        nonlocal creates
        if method == "POST" and path.endswith("/model-versions/create") and status == 200:
            creates += 1
            return creates == 2  # the 1st registers the adopted champion
        return False

    proxy = CuttingProxy(
        mlflow_server.spec.url, challengers_version_created, then=mlflow_server.kill
    ).start()
    registry = Registry(proxy.url)
    retrainer = Retrainer(
        store, spec, registry, model_repository(settings), None, settings.shared_store("datasets")
    )
    outcome: list[dict[str, object] | BaseException] = []

    def train() -> None:
        try:
            outcome.append(retrainer.run("manual"))
        except BaseException as error:
            outcome.append(error)

    training = threading.Thread(target=train)
    training.start()
    try:
        # Started again from this thread: a child dies with the thread that started it.
        wait_until(proxy.cut.is_set, timeout=240, interval=0.1)
        mlflow_server.start()
        mlflow_server.wait_healthy()
        proxy.heal()
        training.join(240)
    finally:
        proxy.stop()
    (record,) = outcome
    assert isinstance(record, dict), record
    assert proxy.cuts == 1

    assert record["state"] == TrainingState.PROMOTED, record
    registry = Registry(mlflow_server.spec.url)
    versions = registry.versions(spec.name)
    # The adopted champion and the run's challenger, once; the challenger now champion.
    assert [v.version for v in versions] == ["1", "2"], versions
    assert versions[1].run_id == record["mlflow_run_id"]
    assert CHAMPION in versions[1].aliases and versions[1].triton_version == 2
    assert record["mlflow_version"] == "2" and record["triton_version"] == 2
    mlflow_run = registry.client.get_run(str(record["mlflow_run_id"]))
    assert mlflow_run.info.status == "FINISHED"
    assert model_repository(settings).champion(spec.name) == 2
