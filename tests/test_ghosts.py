"""Flow runs whose process is gone: told from live ones by their mark, ended with the reason,
their concurrency slot freed (also after a Prefect restart lost the slot's lease), their
training rows ended."""

from __future__ import annotations

import os
import subprocess
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.states import Pending, Running
from sqlalchemy import select

from flows.ghosts import UNMARKED_GRACE, Sweeper, end_training_rows, ghost_reason
from flows.process import START_LABEL, process_alive, process_start
from radloop.app.supervisor import Child
from radloop.db import Store, TrainingRun, utcnow
from radloop.settings import Settings
from tests.conftest_marks import ONCE

HOST = "ct-host-1"
RETRAIN = "retrain-model/retrain"
# A second deployment of the flow, without a concurrency limit.
NIGHTLY = "retrain-model/nightly"


def gone_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def run(
    state: StateType = StateType.RUNNING,
    mark: str | None = None,
    start: str | None = None,
    age: timedelta = timedelta(0),
    **fields: Any,
) -> FlowRun:
    return FlowRun(
        flow_id=uuid4(),
        name="ghostly-run",
        infrastructure_pid=mark,
        labels={START_LABEL: start} if start else {},
        state=State(type=state, name=state.value.title(), timestamp=utcnow() - age),
        **fields,
    )


def test_a_process_is_alive_only_while_it_runs_and_only_the_one_that_started_then() -> None:
    me = os.getpid()
    assert process_alive(me, process_start(me))
    assert process_alive(me, None)
    assert not process_alive(me, "another-boot:12345")  # a later process with this pid
    assert not process_alive(gone_pid(), None)


def test_a_run_marked_with_this_host_and_a_gone_process_is_a_ghost() -> None:
    reason = ghost_reason(run(mark=f"{HOST}:4242"), HOST, utcnow(), lambda *_: False)
    assert reason == f"its process {HOST}:4242 no longer exists (stopped or crashed)"


def test_a_run_whose_process_lives_or_that_another_host_runs_is_not_a_ghost() -> None:
    now = utcnow()
    assert ghost_reason(run(mark=f"{HOST}:4242"), HOST, now, lambda *_: True) is None
    elsewhere = run(mark="ct-host-2:4242", age=timedelta(days=1))
    assert ghost_reason(elsewhere, HOST, now, lambda *_: False) is None


def test_an_unmarked_run_is_a_ghost_only_after_its_grace_period() -> None:
    now = utcnow()
    young = run(StateType.PENDING, age=UNMARKED_GRACE - timedelta(seconds=5))
    assert ghost_reason(young, HOST, now, lambda *_: False) is None
    old = run(StateType.PENDING, age=UNMARKED_GRACE + timedelta(seconds=5))
    reason = ghost_reason(old, HOST, now, lambda *_: False)
    assert reason is not None and reason.startswith("Pending since")
    assert "no process ever started it" in reason


def add_row(store: Store, model: str, trigger: str, age: timedelta, state: str = "running") -> int:
    started = utcnow() - age
    with store.transaction() as session:
        row = TrainingRun(
            model_name=model,
            trigger=trigger,
            state=state,
            epochs=10,
            started_at=started,
            heartbeat_at=started,
        )
        session.add(row)
        session.flush()
        return row.id


def test_a_crashed_retrain_run_ends_its_running_rows_and_no_others(store: Store) -> None:
    older = add_row(store, "liver", "manual", timedelta(hours=2))  # before the run: not its
    other_model = add_row(store, "spleen", "manual", timedelta(minutes=5))
    other_trigger = add_row(store, "liver", "schedule", timedelta(minutes=5))
    done = add_row(store, "liver", "manual", timedelta(minutes=5), state="rejected")
    its = add_row(store, "liver", "manual", timedelta(minutes=5))
    crashed = run(
        parameters={"model": "liver", "trigger": "manual"},
        start_time=utcnow() - timedelta(minutes=6),
    )

    assert end_training_rows(store, crashed, "its process h:1 no longer exists") == [its]
    with store.read() as session:
        rows = {r.id: r for r in session.scalars(select(TrainingRun))}
    assert rows[its].state == "failed" and rows[its].finished_at is not None
    assert rows[its].decision == "crashed: its process h:1 no longer exists"
    for untouched in (older, other_model, other_trigger):
        assert rows[untouched].state == "running"
    assert rows[done].state == "rejected"


def deployment(client: SyncPrefectClient, name: str, limit: int | None) -> UUID:
    flow, deployment_name = name.split("/")
    return client.create_deployment(
        client.create_flow_from_name(flow), deployment_name, concurrency_limit=limit
    )


def proposed(client: SyncPrefectClient, flow_run_id: UUID, state: State[Any]) -> State[Any]:
    """The state Prefect's orchestration gave the run for the proposal."""
    given = client.set_flow_run_state(flow_run_id, state).state
    assert given is not None
    return given


def started(
    client: SyncPrefectClient, deployment_id: UUID, mark: str | None, **params: Any
) -> UUID:
    """A run of the deployment claimed (Pending: it takes a slot) and running, marked."""
    flow_run = client.create_flow_run_from_deployment(deployment_id, parameters=params)
    assert proposed(client, flow_run.id, Pending()).is_pending()
    assert proposed(client, flow_run.id, Running()).is_running()
    if mark is not None:
        start = process_start(int(mark.rpartition(":")[2])) or ""
        client.update_flow_run_labels(flow_run.id, {START_LABEL: start})
        client.update_flow_run(flow_run.id, infrastructure_pid=mark)
    return flow_run.id


@ONCE  # Prefect's run states: nothing database-specific
def test_after_a_prefect_restart_a_ghost_holds_its_slot_until_ended_then_the_next_run_starts(
    prefect_server: Child, settings: Settings, store: Store
) -> None:
    host = "radloop-test-host"
    with get_client(sync_client=True) as client:
        retrain = deployment(client, RETRAIN, 1)
        nightly = deployment(client, NIGHTLY, None)
        ghost = started(client, retrain, f"{host}:{gone_pid()}", model="liver", trigger="manual")
        row = add_row(store, "liver", "manual", timedelta(0))
        second = started(client, nightly, f"{host}:{gone_pid()}", model="spleen")
        alive = started(client, nightly, f"{host}:{os.getpid()}", model="kidney")
        elsewhere = started(client, nightly, "ct-host-2:1", model="lung")
        unmarked = started(client, nightly, None, model="heart")

    # The stack stops with the runs in flight; the server's in-memory slot leases go with it.
    prefect_server.stop()
    prefect_server.start()
    prefect_server.wait_healthy()
    with get_client(sync_client=True) as client:
        waiting = client.create_flow_run_from_deployment(retrain, parameters={"model": "liver"})
        refused = proposed(client, waiting.id, Pending())
        assert (refused.type, refused.name) == (StateType.SCHEDULED, "AwaitingConcurrencySlot")

        sweeper = Sweeper(store, [RETRAIN, NIGHTLY], host=host)
        assert {g.run.id for g in sweeper.sweep(client)} == {ghost, second}

        ended = client.read_flow_run(ghost).state
        assert ended is not None and ended.type == StateType.CRASHED
        assert ended.message is not None and "no longer exists" in ended.message
        assert proposed(client, waiting.id, Pending()).is_pending()  # the slot is free
        for live in (alive, elsewhere, unmarked):
            state = client.read_flow_run(live).state
            assert state is not None and state.is_running()
        with store.read() as session:
            assert session.get_one(TrainingRun, row).state == "failed"

        # A sweep again finds nothing new; once past its grace, the unmarked run is a ghost.
        assert sweeper.sweep(client) == []
        later = Sweeper(
            store, [RETRAIN, NIGHTLY], host=host, clock=lambda: utcnow() + 2 * UNMARKED_GRACE
        )
        assert {g.run.id for g in later.sweep(client)} == {unmarked, waiting.id}
