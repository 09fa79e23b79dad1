"""`radloop up` stopped in the middle of a training, then started again: the run the stop
left RUNNING in Prefect is ended as crashed, its concurrency slot and its training_runs row
are freed, and the next training runs to a decision."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest
import yaml
from sqlalchemy import select

from agents.nifti import read_label_map
from radloop.db import Store, TrainingRun
from radloop.modelspec import PACKAGED_MODELS, load_spec
from radloop.settings import Settings
from radloop.wait import wait_until
from tests.conftest_marks import ONCE
from tests.drafted import annotator, received_phantom, worklist
from tests.models import export_version
from tests.servers import RADLOOP, RadloopProcess, radloop_json

# Runs the whole `radloop up`, twice.
pytestmark = pytest.mark.slow

MODEL = "phantom-abdomen"


def write_spec(folder: Path, epochs: int, steps_per_epoch: int) -> None:
    """The packaged spec with its training length changed (the flow reads specs per run)."""
    spec = yaml.safe_load((PACKAGED_MODELS / f"{MODEL}.yaml").read_text())
    spec["retraining"].update(epochs=epochs, steps_per_epoch=steps_per_epoch)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{MODEL}.yaml").write_text(yaml.safe_dump(spec))


def validated_train_label(settings: Settings, tmp_path: Path) -> None:
    """One study drafted, corrected and validated (single reader) into the train split, through
    the annotator and the worklist as `radloop up` runs them."""
    review = settings.review.model_copy(update={"single_reader": True, "holdout_fraction": 0.0})
    settings = settings.model_copy(update={"review": review})
    spec = load_spec(settings.effective_models_dir / f"{MODEL}.yaml")
    store = Store.open(settings.effective_database_url)
    try:
        study = received_phantom(store, settings, tmp_path, seed=71)
        case = annotator(store, settings, None).annotate(study.study_uid, 1, spec).annotation_id
        cases = worklist(store, settings, spec)
        cases.claim(case, "ann")
        truth = read_label_map(study.truth).transpose(2, 1, 0)
        affine = nib.nifti1.load(study.truth).affine  # type: ignore[no-untyped-call]
        upload = nib.Nifti1Image(truth.astype(np.uint8), affine)  # type: ignore[no-untyped-call]
        cases.correct_with_nifti(case, "ann", bytes(upload.to_bytes()))
    finally:
        store.close()


def flow_run(settings: Settings, flow_run_id: str) -> dict[str, Any]:
    response = httpx.get(f"{settings.prefect.effective_api_url}/flow_runs/{flow_run_id}")
    response.raise_for_status()
    return dict(response.json())


def training_rows(settings: Settings) -> list[TrainingRun]:
    store = Store.open(settings.effective_database_url, migrate=False)
    try:
        with store.read() as session:
            rows = list(session.scalars(select(TrainingRun).order_by(TrainingRun.id)))
            session.expunge_all()
            return rows
    finally:
        store.close()


@pytest.mark.timeout(900)
@ONCE  # Prefect's run states and the supervisor's stop: nothing database-specific
def test_a_training_cut_by_a_stop_is_ended_as_crashed_and_the_next_training_runs(
    radloop_env: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    # Long enough that the stop surely lands during the first training.
    write_spec(models, epochs=50, steps_per_epoch=8)
    env = {**radloop_env, "RADLOOP_MODELS_DIR": str(models)}
    settings = settings.model_copy(update={"models_dir": models})
    export_version(settings, load_spec(models / f"{MODEL}.yaml"))
    validated_train_label(settings, tmp_path)

    up = RadloopProcess(env, command=("up",)).start(timeout=240)
    try:
        requested = radloop_json(env, "train", MODEL)
        ghost = requested["flow_run_id"]

        def training() -> bool:
            rows = training_rows(settings)
            running = flow_run(settings, ghost)["state_type"] == "RUNNING"
            return running and bool(rows) and rows[-1].state == "running"

        wait_until(training, timeout=180, interval=1)
    finally:
        assert up.stop(sig=signal.SIGINT, timeout=60) == 0, up.output()

    write_spec(models, epochs=1, steps_per_epoch=1)  # the next training: short
    again = RadloopProcess(env, command=("up",)).start(timeout=240)
    try:
        # `radloop flows serve` ends it as it starts, before its runner takes runs.
        def no_longer_running() -> dict[str, Any] | None:
            run = flow_run(settings, ghost)
            return run if run["state_type"] != "RUNNING" else None

        ended = wait_until(no_longer_running, timeout=120, interval=1)
        assert ended["state_type"] == "CRASHED", ended["state"]
        assert "no longer exists" in ended["state"]["message"]
        (cut,) = training_rows(settings)
        assert cut.state == "failed" and "crashed" in (cut.decision or ""), cut.decision

        finished = subprocess.run(
            [RADLOOP, "train", MODEL, "--wait", "--json", "--timeout", "300"],
            env=env,
            capture_output=True,
            text=True,
            timeout=360,
        )
        assert finished.returncode == 0, finished.stderr + finished.stdout
        result = json.loads(finished.stdout)
        # No holdout labels to judge on: decided, and rejected by the gate.
        assert result["state"] == "rejected", result
        assert result["training_run_id"] == cut.id + 1
    finally:
        assert again.stop(sig=signal.SIGINT, timeout=60) == 0, again.output()
