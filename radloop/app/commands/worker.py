"""`radloop worker --queue annotate`: a long-lived annotation worker (a Prefect task worker).

It loads settings, model specs, the database, Triton and Orthanc clients and the heavy imports
once, then drafts each study it receives over Prefect's websocket with no process start. Run
one per GPU server, beside that server's Triton; several workers on several hosts share the
work. It reports itself (host, queue, pid, last seen) every few seconds, which `radloop status`
lists, and renews the lease of each study it drafts: a worker that dies lets its studies go to
another one when the lease runs out (`annotation.job_lease_seconds`).
"""

from __future__ import annotations

import contextvars
import logging
import os
import signal
import threading
import time
from typing import Annotated

import typer

from radloop.app.commands.common import (
    cli_model_specs,
    cli_settings,
    configure_logging,
    console,
    err_console,
    open_store,
    prefect_client,
)
from radloop.db import utcnow
from radloop.domain import WorkerQueue
from radloop.settings import Settings

log = logging.getLogger(__name__)


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
    """Run a worker for annotation (Prefect background tasks), near a Triton."""
    settings = cli_settings()
    configure_logging(settings)
    cli_model_specs(settings)  # refuse to start with a broken spec
    if queue is not WorkerQueue.ANNOTATE:
        err_console.print(f"[red]radloop worker: queue {queue.value} is not served yet[/red]")
        raise typer.Exit(2)
    open_store(settings).close()  # exit 2 on an outdated schema, before Prefect starts
    settings.prefect_results_dir.mkdir(parents=True, exist_ok=True)
    with prefect_client(settings):
        _serve_annotation(settings, concurrency or settings.annotation.worker_concurrency)


def _serve_annotation(settings: Settings, limit: int) -> None:
    from prefect.task_worker import serve

    from agents.jobs import WorkerRegistry, heartbeat_seconds
    from flows.annotate import retrying, warm
    from flows.process import this_host

    state = warm()  # imports, clients, specs: once, before the first study
    registry = WorkerRegistry(state.store)
    started = utcnow()
    stop = threading.Event()

    def report() -> None:
        while not stop.is_set():
            try:
                registry.beat(state.worker, this_host(), os.getpid(), WorkerQueue.ANNOTATE, started)
                for lost in state.jobs.renew(state.holding(), state.worker):
                    log.warning("job %s was taken over by another worker", lost)
            except Exception as error:  # the database is away for a moment: the next beat
                log.warning("worker heartbeat failed: %r", error)
            stop.wait(heartbeat_seconds(settings.annotation.job_lease_seconds))

    threading.Thread(
        target=contextvars.copy_context().run, args=(report,), name="heartbeat", daemon=True
    ).start()
    console.print(
        f"radloop worker {state.worker}: annotation, {limit} at once, "
        f"Prefect {settings.prefect.effective_api_url}"
    )
    task = retrying(settings)
    # SIGTERM and SIGHUP stop it like Ctrl-C: runs in flight are left to their leases.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
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
        try:
            registry.leave(state.worker)
        except Exception as error:
            log.warning("could not remove worker %s from the registry: %r", state.worker, error)
        state.store.close()
