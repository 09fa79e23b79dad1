"""`radloop worker --queue annotate|train`: the processes that run radloop's work, on any host.

* `annotate`: a long-lived annotation worker (a Prefect task worker). It loads settings, model
  specs, the database, Triton and Orthanc clients and the heavy imports once, then drafts each
  study it receives over Prefect's websocket with no process start. Run one per GPU server,
  beside that server's Triton; several workers on several hosts share the work. It renews the
  lease of each study it drafts: a worker that dies lets its studies go to another one when the
  lease runs out (`annotation.job_lease_seconds`).
* `train`: the Prefect worker of the work pool `retrain.work_pool`. It registers the
  `retrain-model/retrain` deployment there (event trigger on validated labels, the retraining
  schedule, `radloop train`; one run at a time) and runs each training as a flow run: a new
  process beside it (process pool, the default), or a Kubernetes Job or Docker container with
  a GPU of its own (`retrain.work_pool_type`, job templates in deploy/). It also sweeps the
  runs a stop or a crash left behind (`flows.ghosts`).

Both report themselves (host, queue, pid, last seen) every few seconds: `radloop status` lists
them and `radloop up` calls its workers healthy once they have.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import json
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
from radloop.settings import RetrainSettings, Settings, WorkPoolType

if TYPE_CHECKING:
    from prefect.workers.base import BaseWorker

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
    if not settings.object_store.url:
        settings.prefect_results_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM and SIGHUP stop it like Ctrl-C: runs in flight are left to their leases.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    # Threads that Prefect's integrations start outside its settings context (prefect-
    # kubernetes's observer of Jobs) find the API in the environment, read at Prefect's import.
    os.environ["PREFECT_API_URL"] = settings.prefect.effective_api_url
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
    from flows.storage import save_storage_block

    save_storage_block(settings)  # where submitters put the parameters it reads
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


class WorkPoolError(RuntimeError):
    """The training work pool cannot be served as the settings describe it."""


# The Prefect worker that runs each type of pool, from prefect, prefect-docker and
# prefect-kubernetes.
WORKERS = {
    WorkPoolType.PROCESS: ("prefect.workers.process", "ProcessWorker"),
    WorkPoolType.DOCKER: ("prefect_docker.worker", "DockerWorker"),
    WorkPoolType.KUBERNETES: ("prefect_kubernetes.worker", "KubernetesWorker"),
}


def _ensure_pool(settings: Settings) -> type[BaseWorker[Any, Any, Any]]:
    """The training work pool as the settings describe it, and the Prefect worker of its type.
    Creates the pool if missing; keeps its job template equal to `retrain.work_pool_template`
    when that is set; refuses a pool of another type (its runs would wait for a worker that
    never comes)."""
    from prefect.exceptions import PrefectHTTPStatusError

    retrain = settings.retrain
    module, name = WORKERS[retrain.work_pool_type]
    worker_class: type[BaseWorker[Any, Any, Any]] = getattr(importlib.import_module(module), name)
    template = None
    if retrain.work_pool_template is not None:
        try:
            template = json.loads(retrain.work_pool_template.read_text())
        except (OSError, ValueError) as error:
            raise WorkPoolError(
                f"retrain.work_pool_template {retrain.work_pool_template}: {error}"
            ) from error
    try:
        _pool_as_set(retrain, worker_class, template)
    except (PrefectHTTPStatusError, ValueError) as error:  # Prefect's 422 says why
        raise WorkPoolError(
            f"Prefect refused the job template {retrain.work_pool_template}: {error}"
        ) from error
    return worker_class


def _pool_as_set(
    retrain: RetrainSettings,
    worker_class: type[BaseWorker[Any, Any, Any]],
    template: dict[str, Any] | None,
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    name, kind = retrain.work_pool, retrain.work_pool_type
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=kind.value,
                    base_job_template=template or worker_class.get_default_base_job_template(),
                )
            )
            log.info("created the %s work pool %s", kind, name)
            return
        if pool.type != kind:
            raise WorkPoolError(
                f"the work pool {name} is a {pool.type} pool, but retrain.work_pool_type is "
                f"{kind}: set RADLOOP_RETRAIN__WORK_POOL_TYPE={pool.type}, or name another "
                "pool in RADLOOP_RETRAIN__WORK_POOL"
            )
        if template is not None and pool.base_job_template != template:
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
            log.info("work pool %s: job template from %s", name, retrain.work_pool_template)


def _serve_training(settings: Settings) -> None:
    from prefect.settings import PREFECT_WORKER_QUERY_SECONDS, temporary_settings

    from agents.jobs import heartbeat_seconds
    from flows.annotate import worker_id
    from flows.ghosts import Sweeper

    pool = settings.retrain.work_pool
    try:
        worker_class = _ensure_pool(settings)
    except WorkPoolError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    store = open_store(settings, migrate=True)
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
    threading.Thread(
        target=contextvars.copy_context().run,
        args=(_score_ahead, settings, store, stop),
        name="score-ahead",
        daemon=True,
    ).start()
    kind = settings.retrain.work_pool_type
    console.print(f"radloop worker {me}: training, {kind} work pool {pool}")

    async def run() -> None:
        async with worker_class(work_pool_name=pool, limit=1, name=f"radloop {me}") as runner:
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


SCORE_AHEAD_SECONDS = 5.0


def _score_ahead(settings: Settings, store: Store, stop: threading.Event) -> None:
    """Between trainings, score each served champion on new holdout labels, so that the gate
    finds those scores kept (agents/retrain/scores.py) and evaluates only the challenger."""
    from agents.retrain.scores import score_ahead
    from model_registry.repository import model_repository

    specs = cli_model_specs(settings)
    repository, datasets = model_repository(settings), settings.shared_store("datasets")
    while not stop.wait(SCORE_AHEAD_SECONDS):
        for spec in specs.values():
            try:
                score_ahead(store, spec, repository, datasets)
            except Exception as error:  # storage or database away: the next round
                log.warning("scoring %s ahead on the holdout failed: %r", spec.name, error)


def _sweep(sweeper: Sweeper) -> None:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            sweeper.sweep(client)
    except Exception as error:  # Prefect unreachable for a moment: the next sweep tries again
        log.warning("sweeping for flow runs without a process failed: %r", error)
