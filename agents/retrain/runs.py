"""The `training_runs` rows of one model, from start to decision. Two runs of one model never
overlap: a running row with a recent heartbeat makes a second start return None (the Prefect
deployment's concurrency limit keeps them apart too; this guard also holds for
`radloop train --local` and on a cluster)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from radloop.db import Store, TrainingRun, utcnow
from radloop.domain import TrainingState, TrainingTrigger
from radloop.events import EventType, ModelEvent, record_event

# A running row whose heartbeat is older than this belongs to a killed process.
STALE_AFTER = timedelta(minutes=30)


class RunBook:
    """The training runs of `model` in `store`."""

    def __init__(self, store: Store, model: str) -> None:
        self.store = store
        self.model = model

    def last_training_start(self) -> datetime | None:
        """When the last run that trained (decided, or running) started."""
        trained = [TrainingState.PROMOTED, TrainingState.REJECTED, TrainingState.RUNNING]
        with self.store.read() as session:
            return session.scalar(
                select(func.max(TrainingRun.started_at)).where(
                    TrainingRun.model_name == self.model,
                    TrainingRun.state.in_([state.value for state in trained]),
                )
            )

    def open(self, trigger: TrainingTrigger, epochs: int) -> int | None:
        """A new running row (and its training.requested event), or None when a run of this
        model is already running. A running row without a heartbeat for `STALE_AFTER` is
        marked failed: its process was killed."""
        now = utcnow()
        with self.store.transaction() as session:
            running = session.scalars(
                select(TrainingRun)
                .where(
                    TrainingRun.model_name == self.model,
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
                model_name=self.model,
                trigger=trigger.value,
                state=TrainingState.RUNNING.value,
                epochs=epochs,
                started_at=now,
                heartbeat_at=now,
            )
            session.add(run)
            session.flush()
            record_event(
                session,
                EventType.TRAINING_REQUESTED,
                ModelEvent(kind="training.requested", model=self.model, training_run_id=run.id),
            )
            return run.id

    def update(self, run_id: int, **values: Any) -> None:
        """Set columns of the run's row, in a transaction of its own."""
        with self.store.transaction() as session:
            row = session.get_one(TrainingRun, run_id)
            for key, value in values.items():
                setattr(row, key, value)

    def finish(self, run_id: int, state: TrainingState, **values: Any) -> None:
        """End the run in `state`, with any other columns."""
        self.update(run_id, state=state.value, finished_at=utcnow(), **values)

    def fail(self, run_id: int, error: Exception) -> None:
        self.finish(run_id, TrainingState.FAILED, decision=f"{type(error).__name__}: {error}")


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
