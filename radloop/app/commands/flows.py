"""`radloop flows serve`: serve radloop's Prefect deployments and their event triggers."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import typer

from radloop.app.commands.common import cli_model_specs, cli_settings, open_store

if TYPE_CHECKING:
    from flows.ghosts import Sweeper
    from radloop.settings import Settings

log = logging.getLogger(__name__)

flows_app = typer.Typer(help="Prefect flows and their deployments.", no_args_is_help=True)


@flows_app.command("serve")
def serve() -> None:
    """Serve `retrain-model` (on every radloop.label.validated, on the retraining schedule,
    and for `radloop train`). Annotation runs on `radloop worker`."""
    settings = cli_settings()
    cli_model_specs(settings)  # refuse to serve with a broken spec
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Prefect's settings context, not this process's environment: the runner passes it on to
    # the flow runs it starts, and the sweeper's thread gets a copy of the context.
    with temporary_settings(updates={PREFECT_API_URL: settings.prefect.effective_api_url}):
        _serve(settings)


def _serve(settings: Settings) -> None:
    from prefect import serve as serve_all
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.events import DeploymentEventTrigger
    from prefect.types.entrypoint import EntrypointType

    from flows.ghosts import Sweeper
    from flows.retrain import retrain_model

    retrain: Any = retrain_model.to_deployment(
        name="retrain",
        triggers=[
            DeploymentEventTrigger(
                expect={"radloop.label.validated"},
                match={"prefect.resource.id": "radloop.label.*"},
                parameters={"model": "{{ event.payload.model }}", "trigger": "threshold"},
            )
        ],
        schedules=[
            CronSchedule(cron=settings.retrain.schedule, timezone=settings.retrain.timezone)
        ],
        parameters={"model": None, "trigger": "schedule"},
        # One training at a time; requests meanwhile wait, then find nothing new (coalesce).
        concurrency_limit=1,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    # Runs a stop or a crash left behind hold their deployment's slot: end them before the
    # runner takes runs, then keep an eye out (flows/ghosts.py).
    sweeper = Sweeper(open_store(settings, migrate=True), [retrain.full_name])
    _sweep(sweeper)  # each run it ends is logged
    threading.Thread(
        target=contextvars.copy_context().run,
        args=(_sweep_periodically, sweeper),
        name="ghost-sweeper",
        daemon=True,
    ).start()
    serve_all(retrain, limit=1, print_starting_message=False)


def _sweep(sweeper: Sweeper) -> None:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            sweeper.sweep(client)
    except Exception as error:  # Prefect unreachable for a moment: the next sweep tries again
        log.warning("sweeping for flow runs without a process failed: %r", error)


def _sweep_periodically(sweeper: Sweeper) -> None:
    from flows.ghosts import SWEEP_SECONDS

    while True:
        time.sleep(SWEEP_SECONDS)
        _sweep(sweeper)
