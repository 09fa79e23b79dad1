"""The `training_runs` rows of one model, from start to end. Two runs of one model never
overlap: a running row with a recent heartbeat makes a second start return None (the Prefect
deployment's concurrency limit keeps them apart too; this guard also holds for
`radloop train --local` and on a cluster).

Every run that starts ends — decided, failed or cancelled — with its MLflow run closed, so
the guard only ever waits for a run that is really training. A run killed outright (SIGKILL,
power loss) cannot end itself: its row stays running until its heartbeat is `STALE_AFTER`
old, and the next start marks it failed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from types import FrameType
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from model_registry.mlflow_registry import Registry
from radloop.db import Label, Selection, Store, TrainingRun, utcnow
from radloop.domain import TrainingState, TrainingTrigger
from radloop.events import EventType, ModelEvent, record_event

log = logging.getLogger(__name__)

# A running row whose heartbeat is older than this belongs to a killed process.
STALE_AFTER = timedelta(minutes=30)


class TrainingCancelled(BaseException):
    """SIGTERM arrived during a training run outside Prefect (`sigterm_cancels`). A
    BaseException, like Prefect's own `TerminationSignal`: no `except Exception` swallows it."""

    def __init__(self, number: int) -> None:
        super().__init__(f"signal {number}")
        self.signal = number


@contextmanager
def sigterm_cancels() -> Iterator[None]:
    """For its duration SIGTERM raises `TrainingCancelled`, so a terminated run can end
    itself as cancelled; the process then still dies of the signal, as its sender asked.
    Changes nothing where SIGTERM already has a handler — inside a Prefect flow run the
    engine's raises `TerminationSignal`, on cancellation too — or off the main thread."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def cancel(number: int, _: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the run end itself
        raise TrainingCancelled(number)

    signal.signal(signal.SIGTERM, cancel)
    try:
        yield
    except TrainingCancelled:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
                ModelEvent(
                    kind=EventType.TRAINING_REQUESTED, model=self.model, training_run_id=run.id
                ),
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

    def end(self, run_id: int, error: BaseException, registry: Registry) -> None:
        """End a run that raised `error`, unless it was decided already: FAILED for an
        Exception; CANCELLED for any other BaseException — Prefect's cancellation
        (`TerminationSignal`), SIGTERM (`TrainingCancelled`), Ctrl-C — which `except
        Exception` would miss, leaving the row running and the model blocked for
        `STALE_AFTER`. The run's MLflow run is closed FAILED or KILLED."""
        failed = isinstance(error, Exception)
        if failed:
            log.error("training run %d of %s failed", run_id, self.model, exc_info=error)
        else:
            log.warning("training run %d of %s cancelled: %r", run_id, self.model, error)
        with self.store.transaction() as session:
            row = session.get_one(TrainingRun, run_id)
            if row.state != TrainingState.RUNNING.value:
                return
            row.state = (TrainingState.FAILED if failed else TrainingState.CANCELLED).value
            row.decision = _describe(error)
            row.finished_at = utcnow()
            mlflow_run_id = row.mlflow_run_id
        if mlflow_run_id is None:
            return
        try:
            registry.client.set_terminated(mlflow_run_id, "FAILED" if failed else "KILLED")
        except Exception:  # the row says how it ended; MLflow may be what failed
            log.warning("MLflow run %s of training run %d left open", mlflow_run_id, run_id)


def record_deploy(
    session: Session,
    model: str,
    run_id: int,
    mlflow_version: str,
    triton_version: int,
    previous: int | None,
    holdout_dice: float | None,
) -> None:
    """A run's challenger serves: its model.promoted and model.deployed events, in the
    caller's transaction."""
    for kind in (EventType.MODEL_PROMOTED, EventType.MODEL_DEPLOYED):
        record_event(
            session,
            ModelEvent(
                kind=kind,
                model=model,
                training_run_id=run_id,
                mlflow_version=mlflow_version,
                triton_version=triton_version,
                previous_triton_version=previous,
                holdout_dice=holdout_dice,
            ),
        )


def _describe(error: BaseException) -> str:
    if isinstance(error, Exception):
        return f"{type(error).__name__}: {error}"
    number = getattr(error, "signal", None)  # Prefect's TerminationSignal and ours carry it
    return f"cancelled: {type(error).__name__}" + (
        f" (signal {number})" if isinstance(number, int) else ""
    )


def selected_by(store: Store, label_ids: list[int]) -> dict[str, int]:
    """How the labels were picked for their readers: the strategy of each label's last recorded
    selection ("urgent" for a case a reviewer marked; "unrecorded" for one claimed before
    selections were recorded), counted."""
    with store.read() as session:
        rows = session.execute(
            select(Label.id, Selection.strategy)
            .join(Selection, Selection.annotation_id == Label.annotation_id, isouter=True)
            .where(Label.id.in_(label_ids))
            .order_by(Selection.id)
        ).all()
    last = {label_id: strategy or "unrecorded" for label_id, strategy in rows}
    return dict(sorted(Counter(last.values()).items()))


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
            "selected_by": row.strategies,
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
