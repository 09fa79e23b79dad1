"""`radloop train MODEL --wait` never waits for ever: it reports a run that ended without a
decision, and gives up at its timeout naming the run's state."""

from __future__ import annotations

import json
import subprocess
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
from prefect.client.schemas.sorting import FlowRunSort
from prefect.states import Crashed

from radloop.app.supervisor import Child
from radloop.wait import wait_until
from tests.conftest_marks import ONCE
from tests.servers import RADLOOP

MODEL = "phantom-abdomen"


def runs_of(client: SyncPrefectClient, deployment_id: UUID) -> list[UUID]:
    flow_runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])
        ),
        sort=FlowRunSort.ID_DESC,
        limit=10,
    )
    return [run.id for run in flow_runs]


@ONCE  # Prefect's run states: nothing database-specific
def test_train_wait_reports_a_run_ended_undecided_and_gives_up_at_its_timeout(
    radloop_env: dict[str, str], prefect_server: Child
) -> None:
    # The retrain deployment, served by no runner: its runs stay scheduled until told.
    with get_client(sync_client=True) as client:
        retrain = client.create_deployment(client.create_flow_from_name("retrain-model"), "retrain")

    waiting = subprocess.run(
        [RADLOOP, "train", MODEL, "--wait", "--timeout", "3", "--json"],
        env=radloop_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert waiting.returncode == 1, waiting.stderr + waiting.stdout
    assert f"{MODEL} not decided within 3 s" in waiting.stderr
    assert "is Scheduled" in waiting.stderr

    with get_client(sync_client=True) as client:
        before = set(runs_of(client, retrain))
    following = subprocess.Popen(
        [RADLOOP, "train", MODEL, "--wait", "--json"],
        env=radloop_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with get_client(sync_client=True) as client:
            (new,) = wait_until(lambda: set(runs_of(client, retrain)) - before, timeout=60)
            client.set_flow_run_state(new, Crashed(message="its process vm:1 no longer exists"))
        out, err = following.communicate(timeout=60)
    finally:
        following.kill()
    assert following.returncode == 1, err + out
    result = json.loads(out)
    assert result["state"] == "failed" and result["training_run_id"] is None
    assert result["decision"].endswith("Crashed: its process vm:1 no longer exists")
