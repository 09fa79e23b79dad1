"""`radloop worker --queue annotate|train`: the processes that run radloop's work, on any host.

* `annotate`: a long-lived annotation worker (a Prefect task worker). It loads settings, model
  specs, the database, Triton and Orthanc clients and the heavy imports once, then drafts each
  study it receives over Prefect's websocket with no process start. Run one per GPU server,
  beside that server's Triton; several workers on several hosts share the work. It renews the
  lease of each study it drafts: a worker that dies lets its studies go to another one when the
  lease runs out (`annotation.job_lease_seconds`).
* `train`: a Prefect process worker of the work pool `retrain.work_pool`. It registers the
  `retrain-model/retrain` deployment there (event trigger on validated labels, the retraining
  schedule, `radloop train`; one run at a time) and runs each training as a flow run (a new
  process). Docker or Kubernetes pools (deploy/) run the same deployment in containers. It
  also sweeps the runs a stop or a crash left behind (`flows.ghosts`).

Both report themselves (host, queue, pid, last seen) every few seconds: `radloop status` lists
them and `radloop up` calls its workers healthy once they have.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from radloop.app.commands.common import (
    cli_model_specs,
    cli_settings,
    configure_logging,
    console,
    open_store,
    prefect_client,
)
from radloop.db import Store, utcnow
from radloop.domain import WorkerQueue
from radloop.settings import Settings

if TYPE_CHECKING:
    from flows.ghosts import Sweeper

log = logging.getLogger(__name__)

RETRAIN_DEPLOYMENT = "retrain"


def worker(
    queue: Annotated[
        WorkerQueue, typer.Option("--queue", help="What this worker runs.")
    ] = WorkerQueue.ANNOTATE,
    concurrency: Annotated[
        int | None,
        typer.Option(
            min=1, help="Studies drafted at once (default annotation.worker_concurrency)."
        ),
    ] = None,
) -> None:
    """Run a worker: annotation (warm, near a Triton) or training (a work-pool worker)."""
    settings = cli_settings()
    configure_logging(settings)
    # Refuse to start with a broken spec (`radloop up` reports why). The training worker also
    # checks the network it will build; annotation serves TorchScript and never builds one.
    cli_model_specs(settings, networks=queue is WorkerQueue.TRAIN)
    settings.prefect_results_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM and SIGHUP stop it like Ctrl-C: runs in flight are left to their leases.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    with prefect_client(settings):
        if queue is WorkerQueue.ANNOTATE:
            open_store(settings).close()  # exit 2 on an outdated schema, before Prefect
            _serve_annotation(settings, concurrency or settings.annotation.worker_concurrency)
        else:
            _serve_training(settings)


def _report_in(
    store: Store, worker_id: str, queue: WorkerQueue, every: float, also: Callable[[], None]
) -> threading.Event:
    """Report this worker every `every` seconds (and run `also`) until the event is set."""
    from agents.jobs import WorkerRegistry
    from flows.process import this_host

    registry, started, stop = WorkerRegistry(store), utcnow(), threading.Event()

    def report() -> None:
        while not stop.is_set():
            try:
                registry.beat(worker_id, this_host(), os.getpid(), queue, started)
                also()
            except Exception as error:  # the database is away for a moment: the next beat
                log.warning("worker heartbeat failed: %r", error)
            stop.wait(every)
        try:
            registry.leave(worker_id)
        except Exception as error:
            log.warning("could not remove worker %s from the registry: %r", worker_id, error)

    threading.Thread(
        target=contextvars.copy_context().run, args=(report,), name="heartbeat", daemon=True
    ).start()
    return stop


def _serve_annotation(settings: Settings, limit: int) -> None:
    from prefect.task_worker import serve

    from agents.jobs import heartbeat_seconds
    from flows.annotate import retrying, warm

    state = warm()  # imports, clients, specs: once, before the first study

    def renew() -> None:
        for lost in state.jobs.renew(state.holding(), state.worker):
            log.warning("job %s was taken over by another worker", lost)

    every = heartbeat_seconds(settings.annotation.job_lease_seconds)
    stop = _report_in(state.store, state.worker, WorkerQueue.ANNOTATE, every, renew)

    def serve_champions() -> None:
        """Apart from the heartbeat: a Triton load takes seconds, a lease renewal must not."""
        while not stop.is_set():
            try:
                state.serve_champions(wait=False)
            except Exception as error:  # Triton restarting: the next round, or the next study
                log.warning("could not bring this worker's Triton to the champions: %r", error)
            stop.wait(every)

    threading.Thread(
        target=contextvars.copy_context().run,
        args=(serve_champions,),
        name="triton-sync",
        daemon=True,
    ).start()
    console.print(
        f"radloop worker {state.worker}: annotation, {limit} at once, "
        f"Prefect {settings.prefect.effective_api_url}"
    )
    task = retrying(settings)
    try:
        while True:
            try:
                serve(task, limit=limit)
                return
            except KeyboardInterrupt:
                console.print(f"radloop worker {state.worker}: stopping")
                return
            except Exception as error:  # Prefect went away: keep the warm state, reconnect
                log.warning("task worker stopped (%r); reconnecting in 2 s", error)
                time.sleep(2)
    finally:
        stop.set()
        time.sleep(0.2)  # let the heartbeat thread leave the registry
        state.store.close()


def retrain_deployment(settings: Settings) -> Any:
    """`retrain-model/retrain`: on every radloop.label.validated (threshold), on the schedule,
    and for `radloop train`; one run at a time — requests meanwhile wait, then find nothing
    new (coalesce)."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.events import DeploymentEventTrigger
    from prefect.types.entrypoint import EntrypointType

    from flows.retrain import retrain_model

    return retrain_model.to_deployment(
        name=RETRAIN_DEPLOYMENT,
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
        concurrency_limit=1,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def _ensure_pool(name: str) -> None:
    """The work pool, created as a process pool if the site has not made one (a Docker or
    Kubernetes pool from deploy/ is used as it is)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            pool = WorkPoolCreate(name=name, type="process", base_job_template=template)
            client.create_work_pool(pool)
            log.info("created the process work pool %s", name)


def _serve_training(settings: Settings) -> None:
    from prefect.settings import PREFECT_WORKER_QUERY_SECONDS, temporary_settings
    from prefect.workers.process import ProcessWorker

    from agents.jobs import heartbeat_seconds
    from flows.annotate import worker_id
    from flows.ghosts import Sweeper

    pool = settings.retrain.work_pool
    store = open_store(settings, migrate=True)
    _ensure_pool(pool)
    deployment = retrain_deployment(settings)
    deployment.apply(work_pool_name=pool)
    # Runs a stop or a crash left behind hold the deployment's slot: end them before taking
    # runs, then keep an eye out (flows/ghosts.py).
    sweeper = Sweeper(store, [deployment.full_name])
    _sweep(sweeper)
    last_sweep = [time.monotonic()]

    def sweep_now_and_then() -> None:
        from flows.ghosts import SWEEP_SECONDS

        if time.monotonic() - last_sweep[0] >= SWEEP_SECONDS:
            last_sweep[0] = time.monotonic()
            _sweep(sweeper)

    me = worker_id()
    every = heartbeat_seconds(settings.annotation.job_lease_seconds)
    stop = _report_in(store, me, WorkerQueue.TRAIN, every, sweep_now_and_then)
    console.print(f"radloop worker {me}: training, work pool {pool}")

    async def run() -> None:
        async with ProcessWorker(work_pool_name=pool, limit=1, name=f"radloop {me}") as runner:
            await runner.start()

    try:
        # The worker asks for due runs every 10 s by default: a triggered training would
        # wait that long to start.
        with temporary_settings(updates={PREFECT_WORKER_QUERY_SECONDS: 1.0}):
            asyncio.run(run())
    except KeyboardInterrupt:
        console.print(f"radloop worker {me}: stopping")
    finally:
        stop.set()
        time.sleep(0.2)
        store.close()


def _sweep(sweeper: Sweeper) -> None:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            sweeper.sweep(client)
    except Exception as error:  # Prefect unreachable for a moment: the next sweep tries again
        log.warning("sweeping for flow runs without a process failed: %r", error)
