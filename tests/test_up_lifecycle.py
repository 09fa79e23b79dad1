"""`radloop up` ends as users end it — killed in the middle of a training, its terminal closed
with its output pipe gone — and takes every part it started with it. The next start on the data
dir is healthy: the run the kill left RUNNING in Prefect is ended as crashed, its concurrency
slot and its training_runs row freed, and the next training runs to a decision. A port some
other process holds stops the start with that process named, instead of adopting it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest
from sqlalchemy import select

from agents.nifti import read_label_map
from model_registry.mlflow_registry import Registry
from radloop.app import runstate
from radloop.app.supervisor import port_holder
from radloop.db import Store, TrainingRun
from radloop.modelspec import load_spec
from radloop.settings import Settings
from radloop.wait import wait_until
from tests.conftest_marks import ONCE, STACK
from tests.drafted import annotator, received_phantom, worklist
from tests.models import export_version, write_retraining_spec
from tests.servers import RADLOOP, RadloopProcess, dicom_echo, radloop_json

# Each test runs `radloop up`; nothing in them is database-specific.
pytestmark = [pytest.mark.slow, ONCE, STACK]

MODEL = "phantom-abdomen"


def children(settings: Settings) -> dict[str, int]:
    """The process groups of the parts the running `radloop up` started."""
    record = runstate.read(runstate.state_file(settings))
    assert record is not None
    found = {name: child["pid"] for name, child in record["children"].items() if child["pid"]}
    parts = {"orthanc", "prefect", "mlflow", "triton", "trainer", "worker", "review"}
    assert set(found) == parts, record
    return found


def group_alive(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        return True
            except (ProcessLookupError, FileNotFoundError):
                pass
    return False


def assert_all_ended(groups: dict[str, int]) -> None:
    def left() -> list[str]:
        return [name for name, pgid in groups.items() if group_alive(pgid)]

    wait_until(lambda: not left(), timeout=60, what="every part ended")


@pytest.mark.timeout(900)
def test_parts_die_with_radloop_up_killed_mid_training_or_hung_up_and_it_starts_again(
    radloop_env: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    # Long enough that the kill surely lands during the first training.
    spec = write_retraining_spec(models, epochs=50, steps_per_epoch=8)
    env = {**radloop_env, "RADLOOP_MODELS_DIR": str(models)}
    settings = settings.model_copy(update={"models_dir": models})
    export_version(settings, spec)
    validated_train_label(settings, tmp_path)

    # 1. SIGKILL during a training: no goodbye at all. Only radloop itself is killed.
    up = RadloopProcess(env, command=("up", "--no-demo")).start(timeout=300)
    try:
        ghost = radloop_json(env, "train", MODEL)["flow_run_id"]

        def training() -> bool:
            rows = training_rows(settings)
            running = flow_run(settings, ghost)["state_type"] == "RUNNING"
            return running and bool(rows) and rows[-1].state == "running" and rows[-1].epoch >= 1

        wait_until(training, timeout=240, interval=1)
        parts = children(settings)
        command = up.process.command_pid
        assert command is not None
        os.kill(command, signal.SIGKILL)
        assert_all_ended(parts)
    finally:
        up.kill()

    # 2. The next start on the same data dir is healthy, on processes of its own. It runs as
    # `radloop up | tee log` does.
    write_retraining_spec(models, epochs=1, steps_per_epoch=1)  # the next training: short
    errors = Path(env["RADLOOP_DATA_DIR"]) / "up-stderr.log"
    with open(errors, "wb") as stderr:
        piped = subprocess.Popen(
            [RADLOOP, "up", "--no-demo"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        port = int(env["RADLOOP_DICOM__PORT"])
        wait_until(lambda: piped.poll() is None and dicom_echo(port), timeout=300)
        services = radloop_json(env, "status")["services"]
        assert all(s["healthy"] for s in services), services
        parts = children(settings)
        assert {s["name"] for s in services if "supervised" in s} == set(parts)

        # The killed run ended as crashed: recorded by Prefect's engine in the flow's process
        # when the SIGTERM reached it in time, else by the training worker's sweep as it
        # started, before taking runs. Either way its concurrency slot is free (the training
        # below starts).
        def no_longer_running() -> dict[str, Any] | None:
            run = flow_run(settings, ghost)
            return run if run["state_type"] != "RUNNING" else None

        ended = wait_until(no_longer_running, timeout=120, interval=1)
        assert ended["state_type"] == "CRASHED", ended["state"]
        recorders = ("no longer exists", "aborted by Python system exit")
        assert any(r in ended["state"]["message"] for r in recorders), ended["state"]
        # The killed training ended: cancelled by the SIGTERM its guard passed on when radloop
        # died (which Prefect's engine raises as TerminationSignal or, exiting, SystemExit),
        # or, had it not got that far, failed by the sweep that crashed its flow run.
        (cut,) = training_rows(settings)
        ended_by = {"cancelled": "cancelled: ", "failed": "crashed"}
        assert cut.state in ended_by and ended_by[cut.state] in (cut.decision or ""), cut.decision
        # Nor is its MLflow run left RUNNING: closed by the run as it was cancelled, or by the
        # sweep that ended its row.
        mlflow_run_id, registry = (
            cut.mlflow_run_id,
            Registry(settings.mlflow.effective_tracking_uri),
        )
        assert mlflow_run_id is not None
        wait_until(
            lambda: registry.client.get_run(mlflow_run_id).info.status in ("KILLED", "FAILED"),
            timeout=60,
            interval=1,
            what="the killed run's MLflow run ended",
        )
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

        # 3. The terminal closes: tee is gone first, then radloop gets SIGHUP with nobody
        # reading its output.
        assert piped.stdout is not None
        piped.stdout.close()
        piped.send_signal(signal.SIGHUP)
        assert_all_ended(parts)
        assert piped.wait(60) == 0, errors.read_text()
    finally:
        if piped.poll() is None:
            os.killpg(piped.pid, signal.SIGKILL)


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
        cases.correct_with_volume(case, "ann", bytes(upload.to_bytes()))
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


def test_a_port_held_by_another_process_stops_radloop_up_naming_the_holder(
    radloop_env: dict[str, str], settings: Settings
) -> None:
    port = settings.orthanc.http_port
    stranger = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_holder(port), timeout=20)
        result = subprocess.run(
            [RADLOOP, "up", "--no-demo"],
            env={**radloop_env, "COLUMNS": "300"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        stranger.kill()
        stranger.wait()
    assert result.returncode == 1, result.stdout + result.stderr
    said = result.stdout + result.stderr
    assert f"port {port} is held by pid {stranger.pid}" in said, said
    assert "http.server" in said
    assert not runstate.state_file(settings).exists()
