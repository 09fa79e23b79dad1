"""The `radloop` command line: run the services, and look at what they hold."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from radloop.db import Instance, OutboxEvent, Series, Store, Study
from radloop.domain import StudyState
from radloop.settings import Settings, SettingsError, load_settings

app = typer.Typer(help="radloop: the radiology active-learning loop.", no_args_is_help=True)
studies_app = typer.Typer(help="Studies received and their states.", no_args_is_help=True)
app.add_typer(studies_app, name="studies")
console = Console()
err_console = Console(stderr=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as error:
        err_console.print(f"[red]radloop: invalid settings[/red]\n{error}", highlight=False)
        raise typer.Exit(2) from None


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # pynetdicom narrates every PDU at INFO; its warnings are what an operator needs.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _open_store(settings: Settings) -> Store:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return Store.open(settings.effective_database_url)


def _wait_for_signal() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _safe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


@app.command()
def listen() -> None:
    """Run the DICOM listener (C-STORE SCP, study completion) and the outbox dispatcher."""
    from radloop.services import Services

    settings = _settings()
    _configure_logging(settings)
    store = _open_store(settings)
    services = Services(settings, store)
    stop = _wait_for_signal()
    services.start_listener()
    services.start_dispatcher()
    dicom = settings.dicom
    console.print(
        f"radloop listening: DICOM {dicom.ae_title}@{dicom.host}:{dicom.port}, "
        f"events to {settings.prefect.effective_api_url}"
    )
    stop.wait()
    services.stop()
    store.close()


@app.command()
def up() -> None:
    """Start everything on embedded defaults: Orthanc, Prefect, listener, follower, watch folder."""
    from radloop.services import Services
    from radloop.supervisor import Supervisor, orthanc_spec, prefect_spec

    settings = _settings()
    _configure_logging(settings)
    store = _open_store(settings)
    specs = []
    if settings.orthanc.url is None:
        specs.append(orthanc_spec(settings))
    if settings.prefect.api_url is None:
        specs.append(prefect_spec(settings))
    supervisor = Supervisor(specs)
    stop = _wait_for_signal()
    services = Services(settings, store)
    try:
        with console.status("starting " + ", ".join(s.name for s in specs) + " ..."):
            supervisor.start()
        services.start_listener()
        services.start_dispatcher()
        if settings.orthanc.follow:
            services.start_follower()
        if settings.watch.enabled:
            services.start_watch()
        _print_endpoints(settings)
        supervisor.watch(stop)
    finally:
        console.print("stopping ...")
        services.stop()
        supervisor.stop()
        store.close()


def _print_endpoints(settings: Settings) -> None:
    table = Table(title="radloop is up (Ctrl-C stops everything)")
    table.add_column("part")
    table.add_column("where")
    dicom = settings.dicom
    table.add_row("DICOM C-STORE SCP", f"AE {dicom.ae_title} at {dicom.host}:{dicom.port}")
    table.add_row("Orthanc (PACS, DICOMweb)", settings.orthanc.base_url)
    api = settings.prefect.effective_api_url
    table.add_row("Prefect UI", api.removesuffix("/api"))
    table.add_row("Watch folder", str(settings.watch_folder))
    table.add_row("Rejected files", str(settings.rejected_folder))
    table.add_row("Database", _safe_url(settings.effective_database_url))
    console.print(table)


def _study_rows(store: Store, state: StudyState | None, limit: int) -> list[dict[str, Any]]:
    with store.read() as session:
        counts = (
            select(Instance.study_id, func.count(Instance.id).label("n"))
            .group_by(Instance.study_id)
            .subquery()
        )
        series = (
            select(Series.study_id, func.count(Series.id).label("n"))
            .group_by(Series.study_id)
            .subquery()
        )
        query = (
            select(Study, counts.c.n, series.c.n)
            .outerjoin(counts, counts.c.study_id == Study.id)
            .outerjoin(series, series.c.study_id == Study.id)
            .order_by(Study.last_received_at.desc())
            .limit(limit)
        )
        if state is not None:
            query = query.where(Study.state == state.value)
        return [
            _study_json(study, instances or 0, series_count or 0)
            for study, instances, series_count in session.execute(query)
        ]


def _study_json(study: Study, instances: int, series: int) -> dict[str, Any]:
    return {
        "study_id": study.id,
        "study_uid": study.study_uid,
        "state": study.state,
        "revision": study.revision,
        "instances": instances,
        "series": series,
        "modalities": study.modalities.split("\\") if study.modalities else [],
        "study_date": study.study_date,
        "first_received_at": study.first_received_at.isoformat(),
        "last_received_at": study.last_received_at.isoformat(),
        "completed_at": study.completed_at.isoformat() if study.completed_at else None,
        "reason": study.reason,
    }


@studies_app.command("list")
def studies_list(
    as_json: JsonOption = False,
    state: Annotated[StudyState | None, typer.Option(help="Only studies in this state.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many studies.")] = 500,
) -> None:
    """List studies, most recently received first."""
    settings = _settings()
    store = _open_store(settings)
    rows = _study_rows(store, state, limit)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} studies")
    for column in ("study_uid", "state", "revision", "instances", "series", "modalities"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["study_uid"],
            row["state"],
            str(row["revision"]),
            str(row["instances"]),
            str(row["series"]),
            ",".join(row["modalities"]),
        )
    console.print(table)


@studies_app.command("show")
def studies_show(study_uid: str, as_json: JsonOption = False) -> None:
    """One study with its series and the events it produced."""
    settings = _settings()
    store = _open_store(settings)
    with store.read() as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            err_console.print(f"no study with UID {study_uid}")
            raise typer.Exit(1)
        per_series = dict(
            session.execute(
                select(Instance.series_id, func.count(Instance.id))
                .where(Instance.study_id == study.id)
                .group_by(Instance.series_id)
            ).all()
        )
        series = [
            {
                "series_uid": s.series_uid,
                "modality": s.modality,
                "series_number": s.series_number,
                "description": s.description,
                "instances": per_series.get(s.id, 0),
            }
            for s in study.series
        ]
        events = [
            {
                "event": e.event,
                "event_id": e.event_id,
                "created_at": e.created_at.isoformat(),
                "delivered_at": e.delivered_at.isoformat() if e.delivered_at else None,
                "attempts": e.attempts,
                "payload": e.payload,
            }
            for e in session.scalars(
                select(OutboxEvent)
                .where(OutboxEvent.resource_id == f"radloop.study.{study_uid}")
                .order_by(OutboxEvent.id)
            )
        ]
        detail = _study_json(study, sum(per_series.values()), len(series))
    detail.update(series=series, events=events)
    if as_json:
        print(json.dumps(detail, indent=2))
        return
    console.print_json(json.dumps(detail))


@app.command()
def status(as_json: JsonOption = False) -> None:
    """Probe each configured part and say whether it answers."""
    from radloop.health import probe_all

    settings = _settings()
    report = probe_all(settings)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        table = Table(title="radloop status")
        for column in ("name", "url", "healthy", "detail"):
            table.add_column(column)
        for service in report["services"]:
            mark = "[green]yes[/green]" if service["healthy"] else "[red]no[/red]"
            table.add_row(service["name"], service["url"], mark, service.get("detail", ""))
        console.print(table)
        console.print(f"outbox: {report['outbox']}")
    if not all(s["healthy"] for s in report["services"]):
        raise typer.Exit(1)


@app.command("config")
def show_config() -> None:
    """Print the effective settings (after the YAML file and environment), secrets hidden."""
    settings = _settings()
    data = settings.model_dump(mode="json")
    data["database_url"] = _safe_url(settings.effective_database_url)
    if data["orthanc"].get("password"):
        data["orthanc"]["password"] = "***"
    data["dicom"]["allowed_callers"] = [str(r) for r in settings.dicom.allowed_callers]
    print(json.dumps(data, indent=2))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
