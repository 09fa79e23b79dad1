"""Training asked for from the review service (MONAI Label's `/train/`): a run of the retrain
deployment in Prefect — what `radloop train MODEL` requests, so the training worker fine-tunes,
tracks in MLflow, gates on the holdout and hot-reloads — its progress from `training_runs`,
and stopping it by cancelling its flow runs (the worker ends the run `cancelled`).

Prefect is imported when a request needs it: the service starts without paying for it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from agents.retrain import training_record
from agents.review.cases import ReviewError
from radloop.db import Store, TrainingRun
from radloop.domain import RETRAIN_DEPLOYMENT, TrainingState, TrainingTrigger


class PrefectUnavailable(ReviewError):
    status = 503


class TrainingRequests:
    def __init__(self, store: Store, prefect_api_url: str) -> None:
        self.store = store
        self.prefect_api_url = prefect_api_url

    def start(self, model: str) -> dict[str, Any]:
        """Request a run of the retrain deployment for `model` (trigger: manual)."""
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        try:
            with temporary_settings(updates={PREFECT_API_URL: self.prefect_api_url}):
                flow_run: Any = run_deployment(
                    RETRAIN_DEPLOYMENT,
                    parameters={"model": model, "trigger": TrainingTrigger.MANUAL.value},
                    timeout=0,
                )
        except Exception as error:  # Prefect's client raises httpx's and its own kinds
            raise PrefectUnavailable(
                f"Prefect at {self.prefect_api_url} could not start {RETRAIN_DEPLOYMENT}: "
                f"{type(error).__name__}: {error}"
            ) from None
        return {"model": model, "flow_run_id": str(flow_run.id), "state": "requested"}

    def status(self) -> dict[str, Any]:
        """The newest training run of each model, the retrain flow runs not yet ended, and
        whether anything is running or waiting to."""
        with self.store.read() as session:
            newest = dict(
                session.execute(
                    select(TrainingRun.model_name, func.max(TrainingRun.id)).group_by(
                        TrainingRun.model_name
                    )
                ).all()
            )
        runs = [training_record(self.store, run_id) for run_id in newest.values()]
        requested = self.requested()
        running = bool(requested) or any(r["state"] == TrainingState.RUNNING.value for r in runs)
        return {
            "status": "RUNNING" if running else "IDLE",
            "running": running,
            "runs": runs,
            "requested": requested,
        }

    def requested(self) -> list[dict[str, Any]]:
        """Flow runs of the retrain deployment not yet ended: requested and not started, or
        training."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterName,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.client.schemas.sorting import FlowRunSort
        from prefect.settings import PREFECT_API_URL, temporary_settings

        waiting = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED]
        try:
            with (
                temporary_settings(updates={PREFECT_API_URL: self.prefect_api_url}),
                get_client(sync_client=True) as client,
            ):
                runs = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=waiting))
                    ),
                    deployment_filter=DeploymentFilter(
                        name=DeploymentFilterName(any_=[RETRAIN_DEPLOYMENT.split("/")[1]])
                    ),
                    sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                    limit=200,
                )
        except Exception as error:  # as in start
            raise PrefectUnavailable(f"Prefect at {self.prefect_api_url}: {error}") from None
        return [
            {
                "flow_run_id": str(run.id),
                "model": run.parameters.get("model"),
                "state": run.state.name if run.state else None,
            }
            for run in runs
        ]

    def stop(self) -> dict[str, Any]:
        """Cancel every retrain flow run not yet ended; the worker ends a training it was
        running `cancelled` (agents.retrain.runs)."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings
        from prefect.states import Cancelled, Cancelling

        stopped = self.requested()
        with (
            temporary_settings(updates={PREFECT_API_URL: self.prefect_api_url}),
            get_client(sync_client=True) as client,
        ):
            for run in stopped:
                # A run no worker took yet ends at once; a running one is the worker's to end.
                state: Any = Cancelling() if run["state"] == "Running" else Cancelled()
                client.set_flow_run_state(run["flow_run_id"], state, force=True)
        return {"stopped": stopped}
