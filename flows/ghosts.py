"""Flow runs whose process is gone ("ghosts"), found and ended by the training worker.

A run that was PENDING, RUNNING or CANCELLING when its process died (`radloop up` stopped, the
host crashed) stays so in Prefect, and keeps its deployment concurrency slot: the slot's lease
lives in the Prefect server's memory, so once the server restarts nothing ever frees it, and
every later run of the deployment waits in AwaitingConcurrencySlot (retraining has a limit
of 1). `Sweeper` ends such runs; the training worker sweeps before it takes runs,
then every `SWEEP_SECONDS`.

A run is a ghost when
* its mark (`flows.process`) names this host and a process that no longer runs — a run marked
  by another host is that host's to judge, so runners on several hosts never end each
  other's runs; or
* it carries no mark and its state is older than `UNMARKED_GRACE`: its process never reached
  the flow's first line (claimed, then the runner stopped), whichever host claimed it.

A ghost is ended as Crashed (Cancelled when it was cancelling: Prefect allows nothing else),
with the reason, through Prefect's orchestration, whose ReleaseFlowConcurrencySlots frees the
slot (and a run that ended meanwhile is left as it is). Then a retrain run's running
`training_runs` rows end as failed (`end_training_rows`), so the next training is not refused
as "already training", and what they left in MLflow and the model repository is set right
(`set_right`). (Annotation is not a flow run: its background tasks are re-submitted
by the jobs reconciler, `agents.jobs`.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.client.schemas.sorting import FlowRunSort
from prefect.states import Cancelled, Crashed
from sqlalchemy import select

from flows.process import START_LABEL, process_alive, this_host
from radloop.db import Store, TrainingRun, utcnow
from radloop.domain import RETRAIN_FLOW, TrainingState
from radloop.settings import load_settings

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.client.orchestration import SyncPrefectClient

log = logging.getLogger(__name__)

# A live runner's process reaches the flow's first line (and marks the run) within a minute
# of its claim even on a loaded host; Prefect itself gives a claim 5 minutes
# (`initial_deployment_lease_duration`) before its repossessor takes the slot back.
UNMARKED_GRACE = timedelta(minutes=5)
SWEEP_SECONDS = 60.0
# Rows are stamped by radloop's clock, runs by the Prefect server's.
CLOCK_SLACK = timedelta(minutes=1)
_ACTIVE = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]


@dataclass(frozen=True)
class Ghost:
    """A run of one of radloop's deployments whose process is gone, and why we think so."""

    run: FlowRun
    deployment: str  # "flow/deployment"
    reason: str


def ghost_reason(
    run: FlowRun,
    host: str,
    now: datetime,
    alive: Callable[[int, str | None], bool] = process_alive,
) -> str | None:
    """Why `run` (PENDING, RUNNING or CANCELLING) has lost its process, or None when it has
    not, or when that is for another host to say."""
    if run.infrastructure_pid:
        marked_host, _, pid = run.infrastructure_pid.rpartition(":")
        if marked_host != host or not pid.isdigit():
            return None
        if alive(int(pid), str(run.labels.get(START_LABEL) or "") or None):
            return None
        return f"its process {run.infrastructure_pid} no longer exists (stopped or crashed)"
    if run.state is None or now - run.state.timestamp < UNMARKED_GRACE:
        return None
    return (
        f"{run.state.name} since {run.state.timestamp:%Y-%m-%d %H:%M:%S} UTC and no process "
        "ever started it (its runner stopped or crashed first)"
    )


def end_training_rows(store: Store, run: FlowRun, reason: str) -> list[int]:
    """End as failed the `training_runs` rows that retrain flow run `run` left running: rows of
    its model (of every model when it trained all) and trigger, started since the run started.
    The deployment runs one retraining at a time, so no other run of it has rows then (a
    `radloop train --local` of that model meanwhile would be taken for it). Returns ids."""
    started = run.start_time or run.expected_start_time or run.created
    if started is None:
        return []
    since = datetime.fromtimestamp(started.timestamp(), UTC) - CLOCK_SLACK
    query = select(TrainingRun).where(
        TrainingRun.state == TrainingState.RUNNING.value, TrainingRun.started_at >= since
    )
    if run.parameters.get("model"):
        query = query.where(TrainingRun.model_name == run.parameters["model"])
    if run.parameters.get("trigger"):
        query = query.where(TrainingRun.trigger == run.parameters["trigger"])
    ended = []
    with store.transaction() as session:
        for row in session.scalars(query.with_for_update()):
            row.state, row.decision = TrainingState.FAILED.value, f"crashed: {reason}"
            row.finished_at = utcnow()
            ended.append(row.id)
    return ended


def set_right(store: Store, row_ids: list[int]) -> None:
    """What the killed runs of `row_ids` left in MLflow and the model repository, set right
    now rather than by their model's next run (`agents.retrain.recovery`): their MLflow runs
    closed, a deploy cut after the champion pointer moved finished. Left to that next run
    when MLflow does not answer (its client would retry for minutes)."""
    if not row_ids:
        return
    from agents.retrain.recovery import close_abandoned_mlflow_runs, finish_interrupted_deploy
    from model_registry.mlflow_registry import Registry
    from model_registry.repository import model_repository

    with store.read() as session:
        query = select(TrainingRun.model_name).where(TrainingRun.id.in_(row_ids))
        models = sorted(set(session.scalars(query)))
    settings = load_settings()
    registry = Registry(settings.mlflow.effective_tracking_uri)
    if not registry.reachable():
        log.warning("MLflow does not answer: the next run of %s sets its runs right", models)
        return
    repository = model_repository(settings)
    for model in models:
        try:
            finish_interrupted_deploy(store, registry, repository, model)
            close_abandoned_mlflow_runs(store, registry, model)
        except Exception:
            log.warning("%s: left for its next run to set right", model, exc_info=True)


def end_training_rows_on_crash(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:
    """The retrain flow's on_crashed hook (the runner calls it when the run's process died
    under it): end the run's training rows too, and set right what they left."""
    settings = load_settings()
    store = Store.open(settings.effective_database_url, migrate=False)
    try:
        rows = end_training_rows(store, flow_run, state.message or "the flow run's process died")
        set_right(store, rows)
    finally:
        store.close()


class Sweeper:
    """Finds and ends the ghosts among the runs of `deployments` ("flow/deployment" names)."""

    def __init__(
        self,
        store: Store,
        deployments: Sequence[str],
        host: str | None = None,
        alive: Callable[[int, str | None], bool] = process_alive,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.deployments = list(deployments)
        self.host = host or this_host()
        self.alive = alive
        self.clock = clock

    def find(self, client: SyncPrefectClient) -> list[Ghost]:
        names = {}
        for name in self.deployments:
            try:
                names[client.read_deployment_by_name(name).id] = name
            except Exception as error:  # not registered yet (first start): nothing to sweep
                log.debug("deployment %s: %s", name, error)
        if not names:
            return []
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=list(names)),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=_ACTIVE)),
            ),
            # The sync client sends no default sort, which the server refuses.
            sort=FlowRunSort.ID_DESC,
            limit=200,
        )
        now = self.clock()
        ghosts = []
        for run in runs:
            reason = ghost_reason(run, self.host, now, self.alive)
            if reason is not None and run.deployment_id in names:
                ghosts.append(Ghost(run, names[run.deployment_id], reason))
        return ghosts

    def end(self, client: SyncPrefectClient, ghost: Ghost) -> bool:
        """End one ghost and what it left behind; False when Prefect refused (it ended
        meanwhile)."""
        run, reason = ghost.run, ghost.reason
        message = f"radloop: {reason}; ended by radloop worker --queue train on {self.host}"
        state: State[Any] = (
            Cancelled(message=message)
            if run.state_type == StateType.CANCELLING
            else Crashed(message=message)
        )
        result = client.set_flow_run_state(run.id, state)
        if result.status != SetStateStatus.ACCEPT:
            log.info("flow run %s was not ended: %s", run.name, result.details)
            return False
        log.warning("ended flow run %s of %s: %s", run.name, ghost.deployment, reason)
        flow = ghost.deployment.partition("/")[0]
        if flow == RETRAIN_FLOW:
            rows = end_training_rows(self.store, run, reason)
            if rows:
                log.warning("training runs %s of flow run %s ended as failed", rows, run.name)
                set_right(self.store, rows)
        return True

    def sweep(self, client: SyncPrefectClient) -> list[Ghost]:
        """End every ghost found now; return those ended."""
        return [ghost for ghost in self.find(client) if self.end(client, ghost)]
