"""Health probes: each part is asked, not assumed. `radloop status` reports them; the
supervisor waits on the same HTTP probe before it calls a child healthy."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any

import httpx
import psutil
from pynetdicom import AE
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from agents.jobs import connected_window
from radloop.app import runstate
from radloop.app.runstate import ChildState
from radloop.db import AnnotationJob, OutboxEvent, Store, Worker, make_engine, utcnow
from radloop.domain import JobState, WorkerQueue
from radloop.settings import Settings


def probe_dicom(settings: Settings) -> dict[str, Any]:
    dicom = settings.dicom
    host = "127.0.0.1" if dicom.host in ("0.0.0.0", "::") else dicom.host
    entry: dict[str, Any] = {
        "name": "dicom",
        "url": f"dicom://{dicom.ae_title}@{host}:{dicom.port}",
        "port": dicom.port,
        "healthy": False,
    }
    ae = AE(ae_title="RADLOOP-STATUS")
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification SOP Class
    ae.acse_timeout = ae.network_timeout = 5
    tls_args = None
    if dicom.tls is not None:
        entry["url"] = entry["url"].replace("dicom://", "dicom+tls://")
        # Liveness only: the probe does not authenticate the server.
        client = ssl.create_default_context()
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        tls_args = (client, host)
    assoc = ae.associate(host, dicom.port, ae_title=dicom.ae_title, tls_args=tls_args)
    if assoc.is_established:
        result = assoc.send_c_echo()
        assoc.release()
        entry["healthy"] = bool(result and result.Status == 0)
    elif assoc.is_rejected:
        # It answered DICOM; this host just isn't an allowed caller.
        entry.update(healthy=True, detail="answering; status probe not an allowed caller")
    elif dicom.tls is not None and _accepts_tcp(host, dicom.port):
        entry.update(healthy=True, detail="answering TLS; the probe has no client certificate")
    else:
        entry["detail"] = "no answer"
    return entry


def _accepts_tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def http_answer(url: str, timeout: float = 3.0) -> str | None:
    """None when `url` answers a GET below 400; otherwise what went wrong, in a few words.
    An https `url` is one of radloop's own services on this host (the review service with
    `review.tls`): its certificate names the site, not this address, so it is not checked."""
    try:
        response = httpx.get(url, timeout=timeout, verify=not url.startswith("https://"))
    except httpx.HTTPError as error:
        return type(error).__name__
    return None if response.status_code < 400 else f"HTTP {response.status_code}"


def http_ok(url: str) -> Callable[[], bool]:
    """A probe for the supervisor: whether `url` answers a GET below 400."""
    return lambda: http_answer(url, timeout=2.0) is None


def probe_http(name: str, url: str, path: str) -> dict[str, Any]:
    problem = http_answer(url.rstrip("/") + path)
    entry: dict[str, Any] = {"name": name, "url": url, "healthy": problem is None}
    if problem is not None:
        entry["detail"] = problem
    return entry


def probe_all(settings: Settings) -> dict[str, Any]:
    url = settings.effective_database_url
    database: dict[str, Any] = {
        "name": "database",
        "url": make_url(url).render_as_string(hide_password=True),
        "healthy": False,
    }
    outbox: dict[str, Any] = {}
    workers: list[dict[str, Any]] = []
    try:
        store = Store(make_engine(url))  # asks; never creates or upgrades a schema
        with store.read() as session:
            session.execute(text("SELECT 1"))
            outbox["pending"] = session.scalar(
                select(func.count(OutboxEvent.id)).where(OutboxEvent.delivered_at.is_(None))
            )
            outbox["annotation_jobs_waiting"] = session.scalar(
                select(func.count(AnnotationJob.id)).where(AnnotationJob.state != JobState.DONE)
            )
        workers = connected_workers(settings, store)
        store.close()
        database["healthy"] = True
    except Exception as error:
        database["detail"] = type(error).__name__
    services = [
        probe_dicom(settings),
        database,
        probe_http("orthanc", settings.orthanc.base_url, "/system"),
        probe_http("triton", settings.triton.base_url, "/v2/health/ready"),
        probe_http(
            "prefect", settings.prefect.effective_api_url.removesuffix("/api"), "/api/health"
        ),
        probe_http("mlflow", settings.mlflow.effective_tracking_uri, "/health"),
        probe_http("review", settings.review.local_url, "/api/health"),
    ]
    _add_supervision(settings, services)
    return {"services": services, "outbox": outbox, "workers": workers}


def connected_workers(
    settings: Settings, store: Store, queue: WorkerQueue | None = None
) -> list[dict[str, Any]]:
    """Workers heard from within three heartbeats (host, queue, pid, started, last seen)."""
    since = utcnow() - connected_window(settings.annotation.job_lease_seconds)
    query = select(Worker).where(Worker.last_seen_at >= since).order_by(Worker.started_at)
    if queue is not None:
        query = query.where(Worker.queue == queue)
    with store.read() as session:
        return [
            {
                "id": w.id,
                "host": w.host,
                "queue": w.queue,
                "pid": w.pid,
                "started_at": w.started_at.isoformat(),
                "last_seen_at": w.last_seen_at.isoformat(),
            }
            for w in session.scalars(query)
        ]


def worker_connected(settings: Settings, queue: WorkerQueue, host: str) -> Callable[[], bool]:
    """A probe for the supervisor: a live `radloop worker` of `queue` on `host` reports in."""

    def probe() -> bool:
        try:
            store = Store(make_engine(settings.effective_database_url))
            try:
                rows = connected_workers(settings, store, queue)
            finally:
                store.close()
        except Exception:
            return False
        return any(row["host"] == host and psutil.pid_exists(row["pid"]) for row in rows)

    return probe


def _add_supervision(settings: Settings, services: list[dict[str, Any]]) -> None:
    """What the running `radloop up` knows of its children: a child it gave up restarting is
    failed whatever answers its port; a supervised part without a probe is listed too."""
    record = runstate.live_record(settings)
    if record is None:
        return
    by_name = {entry["name"]: entry for entry in services}
    for name, child in record["children"].items():
        entry = by_name.get(name)
        if entry is None:
            entry = {"name": name, "url": child["url"], "healthy": True}
            services.append(entry)
        entry["supervised"] = {
            key: child[key] for key in ("state", "pid", "restarts", "last_exit", "log")
        }
        state = ChildState(child["state"])
        if state is not ChildState.RUNNING:
            entry["healthy"] = False
            if state is ChildState.FAILED:
                entry["detail"] = (
                    f"failed: exited {child['exits_in_a_row']} times in a row (last exit "
                    f"status {child['last_exit']}); radloop up stopped restarting it — see "
                    f"{child['log']}"
                )
            else:
                entry["detail"] = f"{state.value} (radloop up is restarting it)"
