"""Health probes behind `radloop status`: each part is asked, not assumed."""

from __future__ import annotations

import socket
import ssl
from typing import Any

import httpx
from pynetdicom import AE
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from radloop.db import OutboxEvent, Store
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


def probe_http(name: str, url: str, path: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "url": url, "healthy": False}
    try:
        response = httpx.get(url.rstrip("/") + path, timeout=3.0)
        entry["healthy"] = response.status_code < 400
        if not entry["healthy"]:
            entry["detail"] = f"HTTP {response.status_code}"
    except httpx.HTTPError as error:
        entry["detail"] = type(error).__name__
    return entry


def probe_all(settings: Settings) -> dict[str, Any]:
    url = settings.effective_database_url
    database: dict[str, Any] = {
        "name": "database",
        "url": make_url(url).render_as_string(hide_password=True),
        "healthy": False,
    }
    outbox: dict[str, Any] = {}
    try:
        store = Store.open(url, migrate=False)
        with store.read() as session:
            session.execute(text("SELECT 1"))
            outbox["pending"] = session.scalar(
                select(func.count(OutboxEvent.id)).where(OutboxEvent.delivered_at.is_(None))
            )
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
        probe_http(
            "review", f"http://{settings.review.host}:{settings.review.port}", "/api/health"
        ),
    ]
    return {"services": services, "outbox": outbox}
