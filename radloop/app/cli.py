"""The `radloop` command line: run the services, and look at what they hold."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from radloop.app.commands.common import (
    JsonOption,
    cli_model_specs,
    cli_settings,
    configure_logging,
    console,
    err_console,
    open_store,
    prefect_client,
)
from radloop.app.commands.demo import demo_app
from radloop.app.commands.models import models_app
from radloop.app.commands.output import Column, Row, print_json, print_rows
from radloop.app.commands.queue import queue_app
from radloop.app.commands.review import review_app, users_app
from radloop.app.commands.studies import studies_app
from radloop.app.commands.train import train
from radloop.app.commands.worker import worker
from radloop.db import Store, Study, User
from radloop.dicom_settings import DicomSettings
from radloop.domain import WorkerQueue
from radloop.settings import Settings

app = typer.Typer(help="radloop: the radiology active-learning loop.", no_args_is_help=True)
app.add_typer(studies_app, name="studies")
app.add_typer(models_app, name="models")
app.add_typer(demo_app, name="demo")
app.add_typer(queue_app, name="queue")
app.add_typer(review_app, name="review")
app.add_typer(users_app, name="users")
app.command("train")(train)
app.command("worker")(worker)


def _wait_for_signal() -> threading.Event:
    """An event set by Ctrl-C, SIGTERM, or SIGHUP (the terminal closed): a clean stop."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _say(message: str, to: Console = console) -> None:
    """Print, unless the output is gone (`radloop up | tee log` and Ctrl-C ends tee first):
    stopping the children must not depend on anyone reading. Rich answers a broken pipe with
    SystemExit(1) (`Console.on_broken_pipe`), which would skip the stopping."""
    with contextlib.suppress(OSError, ValueError, SystemExit):
        to.print(message)


def _safe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


@app.command()
def listen() -> None:
    """The gateway: DICOM listener (C-STORE SCP, study completion), watch folder, the outbox
    dispatcher (which submits annotation jobs to `radloop worker`s) and, with
    RADLOOP_ORTHANC__URL, the Orthanc follower and the viewer-store reconciler."""
    from radloop.app.services import Services

    settings = cli_settings()
    configure_logging(settings)
    specs = cli_model_specs(settings)
    store = open_store(settings, migrate=True)
    services = Services(settings, store)
    stop = _wait_for_signal()
    with prefect_client(settings):
        services.start_listener()
        services.start_dispatcher(specs)
        if settings.watch.enabled:
            services.start_watch()
        if settings.orthanc.url is not None:  # the site's Orthanc (radloop up embeds one)
            services.start_viewer_reconciler()
            if settings.orthanc.follow:
                services.start_follower()
    dicom = settings.dicom
    console.print(
        f"radloop listening: DICOM {dicom.ae_title}@{dicom.host}:{dicom.port}, "
        f"events and annotation jobs to {settings.prefect.effective_api_url}"
    )
    stop.wait()
    services.stop()
    store.close()


@app.command()
def up(
    demo: Annotated[
        bool | None,
        typer.Option(
            "--demo/--no-demo",
            help="Turn the loop once with phantoms first (default: only on an empty data dir).",
        ),
    ] = None,
) -> None:
    """Start everything on embedded defaults: Orthanc, Prefect, MLflow, Triton, the training
    and annotation workers, the review service, listener, follower, watch folder."""
    settings = cli_settings()
    store = open_store(settings, migrate=True)
    if demo is None:
        demo = first_run_demo(settings, store)
    after_up = None
    if demo:
        from radloop.app.demo import Demo

        console.print("turning the loop once with phantoms first (--no-demo skips)")
        after_up = lambda stop: Demo(settings, store, console).run()  # noqa: E731
    run_stack(settings, store, after_up)


def first_run_demo(settings: Settings, store: Store) -> bool:
    """Whether `radloop up` turns the loop once with phantoms unasked: on an empty data dir,
    unless the site has set who may send it studies (a configured site gets no demo)."""
    return settings.demo_on_first_run and _is_empty(store) and not _site_allow_list(settings)


def _site_allow_list(settings: Settings) -> bool:
    """Whether the site replaced the default allow-list of DICOM callers."""
    return settings.dicom.allowed_callers != DicomSettings().allowed_callers


def run_stack(
    settings: Settings,
    store: Store,
    after_up: Callable[[threading.Event], object] | None = None,
    *,
    exit_after: bool = False,
) -> None:
    """Start the children and in-process services, run `after_up` (in a thread), serve until
    Ctrl-C/SIGTERM — or, with `exit_after`, until `after_up` returns — then stop all."""
    from radloop.app.runstate import state_file
    from radloop.app.services import Services, load_served_models
    from radloop.app.supervisor import (
        Supervisor,
        SupervisorError,
        mlflow_spec,
        orthanc_spec,
        prefect_spec,
        review_spec,
        triton_spec,
        worker_spec,
    )

    configure_logging(settings)
    model_specs = cli_model_specs(settings)
    specs = []
    if settings.orthanc.url is None:
        specs.append(orthanc_spec(settings))
    if settings.prefect.api_url is None:
        specs.append(prefect_spec(settings))
    if settings.mlflow.tracking_uri is None:
        specs.append(mlflow_spec(settings))
    if settings.triton.url is None:
        triton = triton_spec(settings)
        triton.after_start = lambda: load_served_models(settings, model_specs)
        specs.append(triton)
    specs.append(worker_spec(settings, WorkerQueue.TRAIN))
    specs.append(worker_spec(settings, WorkerQueue.ANNOTATE))
    specs.append(review_spec(settings))
    supervisor = Supervisor(specs, settings.supervisor, state_file(settings))
    stop = _wait_for_signal()
    services = Services(settings, store)
    failed: list[BaseException] = []
    try:
        for leftover in supervisor.clean_leftovers():
            console.print(f"ended {leftover}, left running by a radloop up that was killed")
        with console.status("starting " + ", ".join(s.name for s in specs) + " ..."):
            supervisor.start()
        with prefect_client(settings):
            services.start_listener()
            services.start_dispatcher(model_specs)
            services.start_viewer_reconciler()
            if settings.orthanc.follow:
                services.start_follower()
            if settings.watch.enabled:
                services.start_watch()
        _print_endpoints(settings)
        _hint_first_user(store)
        if after_up is not None:

            def background() -> None:
                try:
                    after_up(stop)
                except BaseException as error:
                    failed.append(error)
                    err_console.print(f"[red]{type(error).__name__}: {error}[/red]")
                    if not exit_after:  # `radloop up`: the service goes on without it
                        err_console.print("[yellow]the demo failed; radloop keeps running[/yellow]")
                if exit_after:
                    stop.set()

            threading.Thread(target=background, name="after-up", daemon=True).start()
        supervisor.watch(stop)
    except SupervisorError as error:
        failed.append(error)
        _say(f"[red]{error}[/red]", err_console)
        exit_after = True
    finally:
        _say("stopping ...")
        services.stop()
        supervisor.stop()
        store.close()
    if failed and exit_after:
        raise typer.Exit(1)


def _is_empty(store: Store) -> bool:
    with store.read() as session:
        return not session.scalar(select(func.count()).select_from(Study))


def _print_endpoints(settings: Settings) -> None:
    table = Table(title="radloop is up (Ctrl-C stops everything)")
    table.add_column("part")
    table.add_column("where")
    dicom = settings.dicom
    table.add_row("DICOM C-STORE SCP", f"AE {dicom.ae_title} at {dicom.host}:{dicom.port}")
    table.add_row("Orthanc (PACS, DICOMweb)", settings.orthanc.base_url)
    api = settings.prefect.effective_api_url
    table.add_row("Prefect UI", api.removesuffix("/api"))
    table.add_row("Triton (inference)", settings.triton.base_url)
    table.add_row("MLflow (runs, registry)", settings.mlflow.effective_tracking_uri)
    review = settings.review.base_url
    table.add_row("Worklist (review)", f"{review}/worklist")
    table.add_row("Dashboard", f"{review}/dashboard")
    table.add_row("OHIF viewer, DICOMweb", f"{review}/  ·  {review}/dicom-web")
    table.add_row("REST API (OpenAPI)", f"{review}/docs")
    table.add_row("Watch folder", str(settings.watch_folder))
    table.add_row("Rejected files", str(settings.rejected_folder))
    table.add_row("Database", _safe_url(settings.effective_database_url))
    console.print(table)


def _hint_first_user(store: Store) -> None:
    with store.read() as session:
        if session.scalar(select(func.count()).select_from(User)):
            return
    console.print(
        "no review users yet: [bold]radloop users add NAME --role reader --password[/bold] "
        "(roles: reader, reviewer, ml-engineer, admin)"
    )


@app.command()
def status(as_json: JsonOption = False) -> None:
    """Probe each configured part and say whether it answers; list the connected workers."""
    from radloop.app.probes import probe_all

    settings = cli_settings()
    report = probe_all(settings)
    columns: list[Column | str] = ["name", "url", "healthy", Column("detail", _detail)]
    if as_json:
        print_json(report)
    else:
        print_rows(console, report["services"], columns, "radloop status", as_json=False)
        workers: list[Column | str] = ["host", "queue", "pid", "started_at", "last_seen_at"]
        title = f"{len(report['workers'])} worker(s) connected"
        print_rows(console, report["workers"], workers, title, as_json=False)
        console.print(f"outbox: {report['outbox']}")
    if not all(s["healthy"] for s in report["services"]):
        raise typer.Exit(1)


def _detail(row: Row) -> str:
    return str(row.get("detail", ""))


@app.command("config")
def show_config() -> None:
    """Print the effective settings (after the YAML file and environment), secrets hidden."""
    settings = cli_settings()
    data = settings.model_dump(mode="json")
    data["database_url"] = _safe_url(settings.effective_database_url)
    if data["orthanc"].get("password"):
        data["orthanc"]["password"] = "***"
    data["dicom"]["allowed_callers"] = [str(r) for r in settings.dicom.allowed_callers]
    print_json(data)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
