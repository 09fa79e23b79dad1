"""Retraining one model: fine-tune the champion on the validated train labels, track it in
MLflow, judge champion and challenger on the frozen holdout, and deploy only past the gate.

Each run is a `training_runs` row from start to decision. Two runs of one model never overlap:
a running row with a recent heartbeat makes a second start return "already training" (the
Prefect deployment's concurrency limit keeps them apart too; this guard also holds for
`radloop train` and on a cluster).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from numpy.typing import NDArray
from sqlalchemy import func, select

from agents.trainer import TrainingConfig, evaluate, prepare, train
from model_registry.deploy import hot_reload
from model_registry.inference import TritonBackend
from model_registry.mlflow_registry import CHALLENGER, CHAMPION, Registry, adopt
from model_registry.repository import TritonRepository
from radloop.db import Label, Store, TrainingRun, utcnow
from radloop.domain import LabelSplit, TrainingState, TrainingTrigger
from radloop.events import EventType, ModelEvent, record_event
from radloop.modelspec import ModelSpec
from radloop.settings import Settings

log = logging.getLogger(__name__)

# A running row whose heartbeat is older than this belongs to a killed process.
STALE_AFTER = timedelta(minutes=30)
# Runs whose start ends the window of new train labels.
TRAINED = (TrainingState.PROMOTED, TrainingState.REJECTED, TrainingState.RUNNING)


@dataclass(frozen=True)
class Volume:
    label_id: int
    hu: NDArray[Any]
    labels: NDArray[Any]
    spacing: tuple[float, float, float]


def read_pair(image_path: str, label_path: str) -> tuple[NDArray[Any], NDArray[Any], Any]:
    """A dataset pair written by validation: HU and labels as (slice, row, column), spacing."""
    image = nib.nifti1.load(image_path)  # type: ignore[no-untyped-call]
    labels = nib.nifti1.load(label_path)  # type: ignore[no-untyped-call]
    hu = np.asarray(image.dataobj, dtype=np.float32).transpose(2, 1, 0)
    mask = np.asarray(labels.dataobj, dtype=np.uint8).transpose(2, 1, 0)
    column, row, slice_ = np.linalg.norm(image.affine[:3, :3], axis=0)
    return hu, mask, (float(slice_), float(row), float(column))


def mean(scores: dict[str, float] | None) -> float | None:
    return float(np.mean(list(scores.values()))) if scores else None


class Retrainer:
    def __init__(
        self,
        store: Store,
        spec: ModelSpec,
        registry: Registry,
        repository: TritonRepository,
        backend: TritonBackend | None,
    ) -> None:
        self.store = store
        self.spec = spec
        self.registry = registry
        self.repository = repository
        self.backend = backend

    # -- when -------------------------------------------------------------------------

    def new_train_labels(self) -> int:
        """Validated train labels since the start of the last run that trained."""
        with self.store.read() as session:
            since = session.scalar(
                select(func.max(TrainingRun.started_at)).where(
                    TrainingRun.model_name == self.spec.name,
                    TrainingRun.state.in_([s.value for s in TRAINED]),
                )
            )
            query = select(func.count()).where(
                Label.model_name == self.spec.name, Label.split == LabelSplit.TRAIN.value
            )
            if since is not None:
                query = query.where(Label.created_at > since)
            return int(session.scalar(query) or 0)

    def due(self, trigger: TrainingTrigger) -> str | None:
        """Why a run should start now, or None."""
        fresh = self.new_train_labels()
        if trigger == TrainingTrigger.THRESHOLD and fresh >= self.spec.retraining.threshold:
            return f"{fresh} new train labels >= threshold {self.spec.retraining.threshold}"
        if trigger == TrainingTrigger.SCHEDULE and fresh > 0:
            return f"scheduled, {fresh} new train labels"
        if trigger == TrainingTrigger.MANUAL:
            return f"requested by hand ({fresh} new train labels)"
        return None

    # -- one run ----------------------------------------------------------------------

    def start(self, trigger: TrainingTrigger) -> int | None:
        """Open a training run row, or None when one of this model is already running."""
        now = utcnow()
        with self.store.transaction() as session:
            running = session.scalars(
                select(TrainingRun)
                .where(
                    TrainingRun.model_name == self.spec.name,
                    TrainingRun.state == TrainingState.RUNNING.value,
                )
                .with_for_update()
            ).all()
            for row in running:
                if now - row.heartbeat_at < STALE_AFTER:
                    return None
                row.state, row.decision = TrainingState.FAILED.value, "no heartbeat: process killed"
                row.finished_at = now
            run = TrainingRun(
                model_name=self.spec.name,
                trigger=trigger.value,
                state=TrainingState.RUNNING.value,
                epochs=self.spec.retraining.epochs,
                started_at=now,
                heartbeat_at=now,
            )
            session.add(run)
            session.flush()
            record_event(
                session,
                EventType.TRAINING_REQUESTED,
                ModelEvent(kind="training.requested", model=self.spec.name, training_run_id=run.id),
            )
            return run.id

    def run(
        self, trigger: TrainingTrigger, on_epoch: Callable[[int, float], None] | None = None
    ) -> dict[str, Any]:
        """Train, register, gate and (if promoted) deploy; returns the run's record."""
        reason = self.due(trigger)
        if reason is None:
            return {"state": TrainingState.SKIPPED.value, "decision": "not due: no new labels"}
        run_id = self.start(trigger)
        if run_id is None:
            return {"state": TrainingState.SKIPPED.value, "decision": "a run is already training"}
        try:
            self._run(run_id, reason, on_epoch)
        except Exception as error:
            log.exception("training run %d of %s failed", run_id, self.spec.name)
            self._update(
                run_id,
                state=TrainingState.FAILED.value,
                decision=f"{type(error).__name__}: {error}",
                finished_at=utcnow(),
            )
            raise
        return self.record(run_id)

    def _run(self, run_id: int, reason: str, on_epoch: Callable[[int, float], None] | None) -> None:
        timings: dict[str, float] = {}
        started = time.monotonic()
        spec, settings = self.spec, self.spec.retraining
        train_set = self._volumes(LabelSplit.TRAIN)
        holdout = self._volumes(LabelSplit.HOLDOUT)
        if not train_set:
            raise RuntimeError("no validated train labels")
        parent = self.repository.champion(spec.name)
        champion = self._load_champion(parent)
        if parent is not None:  # a starter or imported champion: give it its MLflow version
            adopt(
                self.registry,
                spec.name,
                self.repository.root / spec.name / str(parent),
                parent,
                "served before radloop trained it (starter or imported)",
            )
        self._update(
            run_id,
            label_ids=[v.label_id for v in train_set],
            holdout_label_ids=[v.label_id for v in holdout],
            parent_version=parent,
        )
        examples = [prepare(v.hu, v.labels, v.spacing, spec) for v in train_set]
        timings["prepare_s"] = time.monotonic() - started
        config = TrainingConfig(
            epochs=settings.epochs,
            steps_per_epoch=settings.steps_per_epoch,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            seed=settings.seed,
        )
        experiment = self.registry.experiment_id(spec.name)
        client = self.registry.client
        mlrun = client.create_run(
            experiment,
            run_name=f"{spec.name}-run{run_id}",
            tags={"radloop.training_run": str(run_id), "radloop.trigger": reason},
        )
        mlrun_id = mlrun.info.run_id
        self._update(run_id, mlflow_run_id=mlrun_id)
        params = {
            "model": spec.name,
            "network": spec.network.name,
            "epochs": config.epochs,
            "steps_per_epoch": config.steps_per_epoch,
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            "seed": config.seed,
            "train_labels": len(train_set),
            "holdout_labels": len(holdout),
            "parent_triton_version": parent if parent is not None else "none",
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "gate_margin": settings.gate_margin,
        }
        for key, value in params.items():
            client.log_param(mlrun_id, key, value)
        client.log_dict(mlrun_id, self._manifest(train_set, holdout), "dataset_manifest.json")

        def epoch_done(epoch: int, loss: float) -> None:
            client.log_metric(mlrun_id, "train_loss", loss, step=epoch)
            self._update(run_id, epoch=epoch, loss=loss, heartbeat_at=utcnow())
            if on_epoch is not None:
                on_epoch(epoch, loss)

        mark = time.monotonic()
        challenger, report = train(
            spec, examples, config, initial=_trainable(spec, champion), on_epoch=epoch_done
        )
        timings["train_s"] = time.monotonic() - mark
        mark = time.monotonic()
        judged = [(v.hu, v.labels, v.spacing) for v in holdout]
        challenger_dice = evaluate(challenger, judged, spec) if judged else {}
        champion_dice = evaluate(champion, judged, spec) if judged and champion else None
        timings["evaluate_s"] = time.monotonic() - mark
        for name, score in challenger_dice.items():
            client.log_metric(mlrun_id, f"holdout_dice_{name}", score)
        for name, score in (champion_dice or {}).items():
            client.log_metric(mlrun_id, f"champion_holdout_dice_{name}", score)

        mark = time.monotonic()
        scripted = torch.jit.script(challenger)
        with tempfile.TemporaryDirectory() as folder:
            artifact = Path(folder) / "model"
            artifact.mkdir()
            torch.jit.save(scripted, str(artifact / "model.pt"))
            (artifact / "spec.json").write_text(spec.model_dump_json(indent=2))
            (artifact / "README.md").write_text(
                _model_card(spec, params, report.epoch_losses, challenger_dice, champion_dice)
            )
            client.log_artifacts(mlrun_id, str(artifact), "model")
        source = f"{client.get_run(mlrun_id).info.artifact_uri}/model"
        challenger_mean, champion_mean = mean(challenger_dice), mean(champion_dice)
        version = self.registry.register(
            spec.name,
            mlrun_id,
            source,
            {
                "radloop.training_run": str(run_id),
                "holdout_dice": f"{challenger_mean:.4f}" if challenger_mean is not None else "",
            },
        )
        self.registry.set_alias(spec.name, CHALLENGER, version)
        timings["register_s"] = time.monotonic() - mark
        if champion_mean is not None and parent is not None:
            registered = self.registry.by_triton_version(spec.name, parent)
            if registered is not None:  # the champion's score on today's holdout
                self.registry.tag(
                    spec.name, registered.version, "holdout_dice", f"{champion_mean:.4f}"
                )
        promote, decision = self._gate(champion is not None, challenger_mean, champion_mean)
        client.set_tag(mlrun_id, "radloop.decision", decision)
        client.log_metric(mlrun_id, "promoted", 1.0 if promote else 0.0)
        with self.store.transaction() as session:
            record_event(
                session,
                EventType.MODEL_REGISTERED,
                ModelEvent(
                    kind="model.registered",
                    model=spec.name,
                    training_run_id=run_id,
                    mlflow_version=version,
                    holdout_dice=challenger_mean,
                ),
            )
        self._update(
            run_id,
            mlflow_version=version,
            champion_dice=champion_dice,
            challenger_dice=challenger_dice,
            decision=decision,
        )
        log.info("%s run %d: %s", spec.name, run_id, decision)
        triton_version = None
        if promote:
            mark = time.monotonic()
            triton_version = self.repository.export(spec, scripted, serve=False)
            if self.backend is not None:
                hot_reload(self.repository, self.backend, spec, triton_version)
            else:
                self.repository.write_config(spec.name, [triton_version])
                self.repository.set_champion(spec.name, triton_version)
            self.registry.tag(spec.name, version, "triton_version", triton_version)
            self.registry.set_alias(spec.name, CHAMPION, version)
            timings["deploy_s"] = time.monotonic() - mark
            with self.store.transaction() as session:
                for kind, event in (
                    ("model.promoted", EventType.MODEL_PROMOTED),
                    ("model.deployed", EventType.MODEL_DEPLOYED),
                ):
                    record_event(
                        session,
                        event,
                        ModelEvent(
                            kind=kind,
                            model=spec.name,
                            training_run_id=run_id,
                            mlflow_version=version,
                            triton_version=triton_version,
                            previous_triton_version=parent,
                            holdout_dice=challenger_mean,
                        ),
                    )
        timings["total_s"] = time.monotonic() - started
        client.set_terminated(mlrun_id)
        self._update(
            run_id,
            state=(TrainingState.PROMOTED if promote else TrainingState.REJECTED).value,
            triton_version=triton_version,
            timings=timings,
            finished_at=utcnow(),
        )

    def _gate(
        self, has_champion: bool, challenger: float | None, champion: float | None
    ) -> tuple[bool, str]:
        margin = self.spec.retraining.gate_margin
        if not has_champion:
            return True, "promoted: no champion yet (cold start)"
        if challenger is None or champion is None:
            return False, "rejected: no holdout labels to judge on"
        if challenger >= champion - margin:
            return True, (
                f"promoted: holdout Dice {challenger:.4f} >= champion {champion:.4f} "
                f"- margin {margin}"
            )
        return False, (
            f"rejected by the gate: holdout Dice {challenger:.4f} < champion {champion:.4f} "
            f"- margin {margin}"
        )

    # -- helpers -------------------------------------------------------------------------

    def _volumes(self, split: LabelSplit) -> list[Volume]:
        with self.store.read() as session:
            rows = session.execute(
                select(Label.id, Label.image_path, Label.label_path)
                .where(Label.model_name == self.spec.name, Label.split == split.value)
                .order_by(Label.id)
            ).all()
        volumes = []
        for label_id, image_path, label_path in rows:
            hu, labels, spacing = read_pair(image_path, label_path)
            volumes.append(Volume(label_id, hu, labels, spacing))
        return volumes

    def _manifest(self, train_set: list[Volume], holdout: list[Volume]) -> dict[str, Any]:
        """Label ids and DICOM UIDs only: what an ML engineer needs to rebuild the dataset."""
        with self.store.read() as session:
            rows = {
                row.id: row
                for row in session.scalars(
                    select(Label).where(Label.id.in_([v.label_id for v in train_set + holdout]))
                )
            }

        def entry(volume: Volume) -> dict[str, Any]:
            label = rows[volume.label_id]
            return {
                "label_id": label.id,
                "annotation_id": label.annotation_id,
                "series_instance_uid": label.series_uid,
                "seg_sop_instance_uid": label.seg_sop_instance_uid,
            }

        return {
            "model": self.spec.name,
            "train": [entry(v) for v in train_set],
            "holdout": [entry(v) for v in holdout],
        }

    def _load_champion(self, version: int | None) -> torch.nn.Module | None:
        if version is None:
            return None
        path = self.repository.root / self.spec.name / str(version) / "model.pt"
        scripted: torch.nn.Module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
        return scripted.eval()

    def _update(self, run_id: int, **values: Any) -> None:
        with self.store.transaction() as session:
            row = session.get_one(TrainingRun, run_id)
            for key, value in values.items():
                setattr(row, key, value)

    @classmethod
    def from_settings(cls, store: Store, spec: ModelSpec, settings: Settings) -> Retrainer:
        """Against the configured MLflow, model repository and Triton."""
        return cls(
            store,
            spec,
            Registry(settings.mlflow.effective_tracking_uri),
            TritonRepository(settings.model_repository),
            TritonBackend(settings.triton.base_url, settings.triton.timeout_seconds),
        )

    def record(self, run_id: int) -> dict[str, Any]:
        return training_record(self.store, run_id)


def training_record(store: Store, run_id: int) -> dict[str, Any]:
    """A training run as the CLI and the flow report it."""
    with store.read() as session:
        row = session.get_one(TrainingRun, run_id)
        return {
            "training_run_id": row.id,
            "model": row.model_name,
            "trigger": row.trigger,
            "state": row.state,
            "decision": row.decision,
            "epoch": row.epoch,
            "epochs": row.epochs,
            "loss": row.loss,
            "train_labels": len(row.label_ids or []),
            "holdout_labels": len(row.holdout_label_ids or []),
            "parent_version": row.parent_version,
            "mlflow_run_id": row.mlflow_run_id,
            "mlflow_version": row.mlflow_version,
            "triton_version": row.triton_version,
            "champion_dice": row.champion_dice,
            "challenger_dice": row.challenger_dice,
            "timings": row.timings,
            "started_at": row.started_at.isoformat(),
            "finished_at": row.finished_at.isoformat() if row.finished_at else None,
        }


def _trainable(spec: ModelSpec, champion: torch.nn.Module | None) -> torch.nn.Module | None:
    """The champion's weights in a fresh (trainable, non-scripted) network of the spec."""
    if champion is None:
        return None
    network: torch.nn.Module = spec.network.build()
    network.load_state_dict(champion.state_dict())
    return network


def _model_card(
    spec: ModelSpec,
    params: dict[str, Any],
    losses: list[float],
    challenger: dict[str, float],
    champion: dict[str, float] | None,
) -> str:
    lines = [
        f"# {spec.name}",
        "",
        spec.description or "radloop segmentation model.",
        "",
        f"Labels: {', '.join(label.name for label in spec.labels)}; input {spec.input.modality}, "
        f"spacing {spec.preprocessing.spacing} mm, window {spec.preprocessing.window.min}.."
        f"{spec.preprocessing.window.max}.",
        "",
        "## Training",
        "",
        "```json",
        json.dumps(params, indent=2),
        "```",
        "",
        f"Final training loss: {losses[-1]:.4f} after {len(losses)} epochs.",
        "",
        "## Holdout Dice (frozen holdout, never trained on)",
        "",
        "| label | this version | champion at training time |",
        "| --- | --- | --- |",
    ]
    for name, score in challenger.items():
        before = f"{champion[name]:.4f}" if champion else "—"
        lines.append(f"| {name} | {score:.4f} | {before} |")
    lines += ["", "Trained on validated corrections by radloop; no patient data in this run."]
    return "\n".join(lines) + "\n"
