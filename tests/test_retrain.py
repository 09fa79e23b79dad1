"""Retraining on validated labels, against real MLflow and Triton: the gate refuses a
challenger trained on corrupted labels (it loaded in Triton while judged, and is withdrawn
without serving), a good challenger is registered, promoted and hot-reloaded, two runs of one
model never overlap, and a cancelled or terminated run ends cancelled without blocking the
next."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from prefect.exceptions import TerminationSignal
from sqlalchemy import select

from agents.nifti import read_label_map
from agents.retrain import Retrainer
from agents.retrain.scores import score_ahead
from agents.review.plots import holdout_by_labels
from agents.trainer import TrainingConfig, prepare, train
from model_registry.inference import TritonBackend
from model_registry.mlflow_registry import CHALLENGER, CHAMPION, Registry
from model_registry.repository import TritonRepository, model_repository
from radloop.app.phantoms import generate
from radloop.app.supervisor import Child
from radloop.db import Label, OutboxEvent, Store, TrainingRun, utcnow
from radloop.domain import TrainingState, TrainingTrigger
from radloop.modelspec import PACKAGED_MODELS, ModelSpec, load_spec
from radloop.settings import Settings
from radloop.wait import wait_until
from tests.conftest import bucket
from tests.conftest_marks import ONCE, STACK
from tests.drafted import annotator, received_phantom, worklist
from tests.models import export_interactive, small_interactive
from tests.servers import S3Server, radloop_json

# Trains and serves models.
pytestmark = [pytest.mark.slow, STACK]


@pytest.fixture(scope="module")
def champion_network() -> torch.jit.ScriptModule:
    """A starter model trained on phantoms (as `radloop models bootstrap` makes one)."""
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    phantoms = [generate(900 + i) for i in range(8)]
    examples = [prepare(p.hu, p.labels, p.spacing, spec) for p in phantoms]
    network, _ = train(spec, examples, TrainingConfig(epochs=20, steps_per_epoch=8, seed=3))
    scripted: torch.jit.ScriptModule = torch.jit.script(network)
    return scripted


def _spec(**retraining: Any) -> ModelSpec:
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    changed = spec.retraining.model_copy(update={"epochs": 6, **retraining})
    return spec.model_copy(update={"retraining": changed})


def corrupted(labels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Wrong on purpose: organs swapped and shifted by 12 voxels."""
    swapped = np.choose(labels, [0, 3, 1, 2]).astype(np.uint8)
    return np.roll(swapped, 12, axis=2)


def validate_studies(
    settings: Settings,
    store: Store,
    spec: ModelSpec,
    tmp_path: Path,
    seeds: list[int],
    label_for: Callable[[int, np.ndarray[Any, Any]], np.ndarray[Any, Any]],
) -> None:
    """Studies pushed, drafted by the champion, corrected by a reader (single-reader mode:
    the save validates), as the review service would do it. `label_for(index, truth)`."""
    single = settings.review.model_copy(update={"single_reader": True})
    cases = worklist(store, settings.model_copy(update={"review": single}), spec)
    for index, seed in enumerate(seeds):
        study = received_phantom(store, settings, tmp_path, seed=seed)
        case = annotator(store, settings, None).annotate(study.study_uid, 1, spec).annotation_id
        cases.claim(case, "ann")
        truth = read_label_map(study.truth)
        affine = nib.nifti1.load(study.truth).affine  # type: ignore[no-untyped-call]
        labels = label_for(index, truth).transpose(2, 1, 0)
        upload = nib.Nifti1Image(labels.astype(np.uint8), affine)  # type: ignore[no-untyped-call]
        cases.correct_with_volume(case, "ann", bytes(upload.to_bytes()))


def splits(store: Store) -> list[str]:
    with store.read() as session:
        return list(session.scalars(select(Label.split).order_by(Label.id)))


def events(store: Store, name: str) -> list[dict[str, Any]]:
    with store.read() as session:
        rows = session.scalars(select(OutboxEvent).where(OutboxEvent.event == name))
        return [row.payload for row in rows]


@ONCE
# Its setup trains the module's starter model, and it starts Triton: 200 s on the shared
# 2-core machine with others' work beside it, over the default 300 s when that was heavier.
@pytest.mark.timeout(600)
# The cluster shape without a shared folder: Triton serves from the bucket, validated pairs,
# staged versions and MLflow's artifacts go there (the other tests here use folders).
@pytest.mark.object_store
def test_the_gate_refuses_a_challenger_trained_on_corrupted_labels(
    settings: Settings,
    store: Store,
    mlflow_server: Child,
    triton: Child,
    champion_network: torch.jit.ScriptModule,
    tmp_path: Path,
    s3_server: S3Server,
    request: pytest.FixtureRequest,
) -> None:
    spec = _spec(threshold=4)
    repository = model_repository(settings)
    repository.export(spec, champion_network)
    backend = TritonBackend(triton.spec.url)
    backend.load(spec.name)
    # Validated in order: the 1st and 6th go to the holdout (fraction 0.2), and keep the truth.
    validate_studies(
        settings,
        store,
        spec,
        tmp_path,
        [81, 82, 83, 84, 85, 86],
        lambda index, truth: truth if index in (0, 5) else corrupted(truth),
    )
    assert splits(store) == ["holdout", "train", "train", "train", "train", "holdout"]
    name = bucket(request.node)
    with store.read() as session:
        paths = [
            p
            for label in session.scalars(select(Label))
            for p in (label.image_path, label.label_path)
        ]
    assert len(paths) == 12 and all(p.startswith(f"s3://{name}/radloop/datasets/") for p in paths)
    assert len(s3_server.keys(name, "radloop/datasets/")) == 12
    registry = Registry(settings.mlflow.effective_tracking_uri)
    retrainer = Retrainer.from_settings(store, spec, settings)
    assert retrainer.due(TrainingTrigger.THRESHOLD) is not None

    result = retrainer.run(TrainingTrigger.THRESHOLD)
    assert result["state"] == TrainingState.REJECTED, result
    assert "rejected by the gate" in result["decision"]
    champion = np.mean(list(result["champion_dice"].values()))
    challenger = np.mean(list(result["challenger_dice"].values()))
    assert challenger < champion - spec.retraining.gate_margin
    # Staged as v2 while judged, then withdrawn: gone from the repository and from Triton.
    assert {"stage_s", "withdraw_s"} <= set(result["timings"])
    assert repository.champion(spec.name) == 1 and repository.versions(spec.name) == [1]
    assert backend.served_versions(spec.name) == ["1"] and repository.candidate(spec.name) is None

    registered = registry.versions(spec.name)  # the starter (adopted) and the challenger
    assert [(v.aliases, v.triton_version) for v in registered] == [
        ([CHAMPION], 1),
        ([CHALLENGER], None),
    ]
    run = registry.client.get_run(result["mlflow_run_id"])
    assert run.data.tags["radloop.decision"] == result["decision"]
    assert run.data.params["train_labels"] == "4"
    # The readers took the cases from the worklist's order: the run says which strategy chose.
    assert run.data.params["selected_by"] == "entropy:4" and result["selected_by"] == {"entropy": 4}
    # The dashboard's "what the order bought" point for this run names the strategy.
    assert "entropy 4" in holdout_by_labels(store, {spec.name: spec})
    assert "holdout_dice_Liver" in run.data.metrics
    assert len(registry.client.get_metric_history(run.info.run_id, "train_loss")) == 6
    manifest = json.loads(
        Path(
            registry.client.download_artifacts(run.info.run_id, "dataset_manifest.json")
        ).read_text()
    )
    assert len(manifest["train"]) == 4 and len(manifest["holdout"]) == 2
    artifacts = s3_server.keys(name, "radloop/mlflow-artifacts/")
    assert any(key.endswith("/dataset_manifest.json") for key in artifacts), artifacts
    assert not (settings.data_dir / "model-repository").exists()
    assert not (settings.data_dir / "datasets").exists()
    for entry in manifest["train"] + manifest["holdout"]:  # ids and UIDs, no patient data
        assert set(entry) == {
            "label_id",
            "annotation_id",
            "series_instance_uid",
            "seg_sop_instance_uid",
        }
    assert [e["kind"] for e in events(store, "radloop.model.registered")] == [
        "radloop.model.registered"
    ]
    assert events(store, "radloop.model.promoted") == []
    assert retrainer.due(TrainingTrigger.THRESHOLD) is None  # the labels were used
    assert retrainer.run(TrainingTrigger.SCHEDULE)["state"] == TrainingState.SKIPPED


@ONCE
def test_a_good_challenger_is_promoted_registered_as_champion_and_hot_reloaded(
    radloop_env: dict[str, str],
    settings: Settings,
    store: Store,
    mlflow_server: Child,
    triton: Child,
    champion_network: torch.jit.ScriptModule,
    tmp_path: Path,
) -> None:
    spec = _spec(threshold=3, gate_margin=0.15)
    repository = TritonRepository(settings.model_repository)
    repository.export(spec, champion_network)
    backend = TritonBackend(triton.spec.url)
    backend.load(spec.name)
    validate_studies(settings, store, spec, tmp_path, [91, 92, 93, 94], lambda _, truth: truth)
    registry = Registry(settings.mlflow.effective_tracking_uri)
    retrainer = Retrainer(store, spec, registry, repository, backend)
    epochs: list[int] = []

    # Between trainings the training worker scores the champion on the holdout, ahead of the
    # gate; never while a training of the model runs.
    datasets = settings.shared_store("datasets")
    running = retrainer.book.open(TrainingTrigger.MANUAL, 1)
    assert running is not None
    assert score_ahead(store, spec, repository, datasets) == 0
    retrainer.book.finish(running, TrainingState.CANCELLED)
    assert score_ahead(store, spec, repository, datasets) == 1  # the one holdout label
    assert score_ahead(store, spec, repository, datasets) == 0
    holdout = [i for i, split in enumerate(splits(store), start=1) if split == "holdout"]
    (ahead,) = retrainer.scores.known(1, holdout).values()

    result = retrainer.run(TrainingTrigger.MANUAL, on_epoch=lambda epoch, _: epochs.append(epoch))
    assert result["state"] == TrainingState.PROMOTED, result
    # The gate took the champion's score as kept; the promoted version's are kept for the next.
    assert result["champion_dice"] == pytest.approx(ahead)
    (kept,) = retrainer.scores.known(2, holdout).values()
    assert result["challenger_dice"] == pytest.approx(kept)
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert result["triton_version"] == 2 and repository.champion(spec.name) == 2
    assert "2" in backend.served_versions(spec.name)
    champion = registry.alias(spec.name, CHAMPION)
    assert champion is not None and champion.triton_version == 2
    assert champion.holdout_dice is not None
    deployed = events(store, "radloop.model.deployed")
    assert [(e["triton_version"], e["previous_triton_version"]) for e in deployed] == [(2, 1)]
    assert set(result["timings"]) >= {
        "train_s",
        "stage_s",  # loaded beside the champion while judged
        "evaluate_s",
        "register_s",
        "deploy_s",
        "triton_load_s",
    }

    listed = {row["version"]: row for row in radloop_json(radloop_env, "models", "list")}
    assert listed[2]["served"] and CHAMPION in listed[2]["aliases"]
    assert listed[2]["holdout_dice"] == pytest.approx(champion.holdout_dice)
    assert not listed[1]["served"] and listed[1]["aliases"] == []

    rolled = radloop_json(radloop_env, "models", "rollback", spec.name)
    assert (rolled["version"], rolled["previous"]) == (1, 2)
    listed = {row["version"]: row for row in radloop_json(radloop_env, "models", "list")}
    assert listed[1]["served"] and listed[1]["aliases"] == [CHAMPION]
    image = np.zeros(spec.inference.roi_size, dtype=np.float32)
    assert backend.infer(spec.name, image, spec.preprocessing.spacing, 1).model_version == "1"
    assert [e["triton_version"] for e in events(store, "radloop.model.rolled_back")] == [1]

    # The task's interactive model learns from the same validated labels, under its own name,
    # gated on holdout Dice after `gate_clicks` simulated clicks per label.
    export_interactive(settings, spec)
    small = small_interactive(spec)
    shorter = small.retraining.model_copy(update={"epochs": 2})  # 16 batches with clicks
    interactive = small.model_copy(update={"retraining": shorter}).as_interactive()
    backend.load(interactive.name)
    clicks = Retrainer(store, interactive, registry, repository, backend)
    assert clicks.due(TrainingTrigger.THRESHOLD) is not None  # none used by it yet
    result = clicks.run(TrainingTrigger.MANUAL)
    assert result["model"] == "phantom-abdomen-deepedit"
    assert result["state"] in (TrainingState.PROMOTED, TrainingState.REJECTED), result
    assert (
        set(result["challenger_dice"])
        == set(result["champion_dice"])
        == {
            "Liver",
            "Spleen",
            "Kidney",
        }
    )
    assert [v.triton_version for v in registry.versions(interactive.name)][:1] == [1]
    served = repository.champion(interactive.name)
    assert served == (2 if result["state"] == TrainingState.PROMOTED else 1)
    assert str(served) in backend.served_versions(interactive.name)
    assert repository.champion(spec.name) == 1  # the task model is untouched


def test_two_runs_of_one_model_never_overlap_and_a_killed_run_does_not_block(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    spec = _spec(threshold=1)
    retrainer = Retrainer(
        store, spec, Registry("http://127.0.0.1:9"), TritonRepository(tmp_path), backend=None
    )
    first = retrainer.start(TrainingTrigger.MANUAL)
    assert first is not None
    assert retrainer.start(TrainingTrigger.MANUAL) is None
    with store.transaction() as session:  # its process was killed an hour ago
        row = session.get_one(TrainingRun, first)
        row.heartbeat_at = utcnow() - timedelta(hours=1)
    second = retrainer.start(TrainingTrigger.MANUAL)
    assert second is not None and second != first
    with store.read() as session:
        assert session.get_one(TrainingRun, first).state == TrainingState.FAILED


@ONCE  # signals and Prefect cancellation: nothing database-specific
def test_a_terminated_or_cancelled_training_ends_cancelled_and_the_next_starts_at_once(
    radloop_env: dict[str, str],
    settings: Settings,
    store: Store,
    mlflow_server: Child,
    tmp_path: Path,
) -> None:
    """Two real interruptions of a training mid-epoch, each a BaseException that `except
    Exception` misses:

    1. a real SIGTERM to a real process training the model (`tests/training_process.py`, as
       `radloop train --local`, or a flow run's process that its runner stops);
    2. Prefect's cancellation: inside a flow run Prefect's SIGTERM bridge raises its
       `TerminationSignal`; here the real type is raised from the epoch hook (an injected
       hook) of a training in this process, where the bridge would raise it.

    Each ends the row `cancelled` and its MLflow run KILLED, and the next training of the
    model starts at once instead of meeting "already training" for 30 minutes."""
    spec = _spec(threshold=1, epochs=1000, steps_per_epoch=1)
    validate_studies(settings, store, spec, tmp_path, [71, 72], lambda _, truth: truth)
    assert splits(store) == ["holdout", "train"]
    registry = Registry(settings.mlflow.effective_tracking_uri)
    retrainer = Retrainer(
        store, spec, registry, TritonRepository(settings.model_repository), backend=None
    )

    def training() -> TrainingRun | None:
        """The latest run, once it has trained an epoch."""
        with store.read() as session:
            row = session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc())).first()
            return row if row is not None and row.epoch >= 1 else None

    def ended(run: TrainingRun) -> tuple[str, str | None, str]:
        """State and decision of its row, and the status of its MLflow run."""
        with store.read() as session:
            row = session.get_one(TrainingRun, run.id)
            assert row.finished_at is not None and row.mlflow_run_id is not None, row.state
            status = registry.client.get_run(row.mlflow_run_id).info.status
            return row.state, row.decision, status

    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.training_process", str(spec_path)], env=radloop_env
    )
    try:
        terminated = wait_until(training, timeout=300, interval=0.2)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == -signal.SIGTERM  # it still dies of the signal
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    assert ended(terminated) == (
        TrainingState.CANCELLED,
        "cancelled: TrainingCancelled (signal 15)",
        "KILLED",
    )

    def cancel(epoch: int, loss: float) -> None:
        raise TerminationSignal(signal=signal.SIGTERM)

    with pytest.raises(TerminationSignal):
        retrainer.run(TrainingTrigger.MANUAL, on_epoch=cancel)
    cancelled = training()  # it started at once: no "already training", and trained an epoch
    assert cancelled is not None and cancelled.id != terminated.id
    assert ended(cancelled) == (
        TrainingState.CANCELLED,
        "cancelled: TerminationSignal (signal 15)",
        "KILLED",
    )
    assert retrainer.due(TrainingTrigger.THRESHOLD) is not None  # a cancelled run used no labels
    assert retrainer.start(TrainingTrigger.MANUAL) is not None
