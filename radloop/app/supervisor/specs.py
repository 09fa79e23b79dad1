"""What `radloop up` runs as child processes — Orthanc, the Prefect server, MLflow, Triton,
the training and annotation workers and the review service — each as a `ChildSpec`:
command, environment, log file under the data dir, the ports it must own and the probe that
says it is healthy."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from model_registry.repository import model_repository
from radloop.app.probes import http_ok, worker_connected
from radloop.domain import WorkerQueue
from radloop.settings import Settings

ORTHANC_BINARY = "/usr/sbin/Orthanc"
LOOPBACK = "127.0.0.1"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    log_file: Path
    healthy: Callable[[], bool]
    url: str
    env: dict[str, str] = field(default_factory=dict)
    start_timeout: float = 90.0
    # Runs once the child is healthy, after every (re)start: e.g. Triton's explicit model loads.
    after_start: Callable[[], None] | None = None
    # Ports the child listens on: held by anyone else, `radloop up` stops and names the holder.
    ports: list[int] = field(default_factory=list)
    # The parts that must be healthy before this one starts (those `radloop up` runs itself).
    after: tuple[str, ...] = ()


def orthanc_spec(
    settings: Settings, radloop_port: int | None = None, bind: str = LOOPBACK
) -> ChildSpec:
    """An Orthanc with DICOMweb, its storage under `<data_dir>/orthanc`, HTTP on loopback (or
    answering other hosts too, reached at `bind`)."""
    home = settings.data_dir / "orthanc"
    home.mkdir(parents=True, exist_ok=True)
    orthanc = settings.orthanc
    config = {
        "Name": "radloop",
        "StorageDirectory": str(home / "storage"),
        "IndexDirectory": str(home / "index"),
        "HttpPort": orthanc.http_port,
        "DicomPort": orthanc.dicom_port,
        "DicomAet": orthanc.ae_title,
        "RemoteAccessAllowed": bind != LOOPBACK,
        "AuthenticationEnabled": False,
        "StableAge": orthanc.stable_age_seconds,
        "OverwriteInstances": False,
        "DicomCheckCalledAet": True,
        "DicomModalities": {
            "radloop": {
                "AET": settings.dicom.ae_title,
                "Host": "127.0.0.1",
                "Port": radloop_port or settings.dicom.port,
            }
        },
        "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    config_file = home / "orthanc.json"
    config_file.write_text(json.dumps(config, indent=2))
    url = f"http://{bind}:{orthanc.http_port}"
    return ChildSpec(
        name="orthanc",
        argv=[ORTHANC_BINARY, str(config_file)],
        log_file=settings.data_dir / "logs" / "orthanc.log",
        healthy=http_ok(f"{url}/system"),
        url=url,
        # dcmtk inside Orthanc otherwise waits on Nagle + delayed ACK for every PDU.
        env={"TCP_NODELAY": "1"},
        ports=[orthanc.http_port, orthanc.dicom_port],
        start_timeout=30.0,
    )


def prefect_spec(
    settings: Settings, bind: str = LOOPBACK, database_url: str | None = None
) -> ChildSpec:
    """A local Prefect server (SQLite under `<data_dir>/prefect`, or `database_url`), UI and
    API on loopback (or `bind`)."""
    home = settings.data_dir / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    port = settings.prefect.port
    prefect = str(Path(sys.executable).with_name("prefect"))
    return ChildSpec(
        name="prefect",
        argv=[prefect, "server", "start", "--host", bind, "--port", str(port)],
        log_file=settings.data_dir / "logs" / "prefect.log",
        healthy=http_ok(f"http://{bind}:{port}/api/health"),
        url=f"http://{bind}:{port}",
        env={
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": f"http://{bind}:{port}/api",
            "PREFECT_API_DATABASE_CONNECTION_URL": database_url
            or f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        },
        ports=[port],
        start_timeout=120.0,
    )


def mlflow_spec(
    settings: Settings, bind: str = LOOPBACK, database_url: str | None = None
) -> ChildSpec:
    """`mlflow server`: tracking and registry on SQLite (or `database_url`) under
    `<data_dir>/mlflow`, artifacts served (proxied: clients need no bucket credentials) from
    `<data_dir>/mlflow/artifacts` or the object store's `mlflow-artifacts/`; UI and API on
    loopback (or `bind`)."""
    home = settings.data_dir / "mlflow"
    home.mkdir(parents=True, exist_ok=True)
    if settings.object_store.url:
        artifacts = settings.object_store.url_of("mlflow-artifacts")
    else:
        (home / "artifacts").mkdir(exist_ok=True)
        artifacts = str(home / "artifacts")
    port = settings.mlflow.port
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    return ChildSpec(
        name="mlflow",
        argv=[
            mlflow,
            "server",
            "--backend-store-uri",
            database_url or f"sqlite:///{home / 'mlflow.db'}",
            "--artifacts-destination",
            artifacts,
            "--host",
            bind,
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        log_file=settings.data_dir / "logs" / "mlflow.log",
        healthy=http_ok(f"http://{bind}:{port}/health"),
        url=f"http://{bind}:{port}",
        env={
            "MLFLOW_TRACKING_URI": f"http://{bind}:{port}",
            # MLflow 3 starts seven huey job-runner processes (GenAI judges, trace rollups)
            # beside the server, 250 MB each and polling while idle; radloop uses neither.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **settings.object_store.environment(),
            # MLflow answers only Host headers it knows: its address on another host's network.
            **(
                {"MLFLOW_SERVER_ALLOWED_HOSTS": f"{bind},{bind}:{port}"} if bind != LOOPBACK else {}
            ),
        },
        ports=[port],
        start_timeout=120.0,
    )


def _prepare_triton_backends(home: Path) -> tuple[Path, Path, Path]:
    """The wheel's server binary, its libraries, and a backends folder holding the python
    backend with the stub built for this Python (copied once under `home`)."""
    import pytriton

    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    libraries = root.parent.parent / "nvidia_pytriton.libs"
    backend = home / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = [
        *(root / "backends" / "python").glob("*.*"),
        root / "python_backend_stubs" / version / "triton_python_backend_stub",
    ]
    for source in sources:
        target = backend / source.name
        if source.is_file() and not target.exists():
            shutil.copy2(source, target)
    return root / "bin" / "tritonserver", libraries, home / "backends"


def triton_spec(settings: Settings, bind: str = LOOPBACK) -> ChildSpec:
    """Triton Inference Server from the nvidia-pytriton wheel, explicit model control, on the
    repository radloop manages, on loopback (or `bind`). Models are loaded by radloop, never
    by polling."""
    triton = settings.triton
    home = settings.data_dir / "triton"
    binary, libraries, backends = _prepare_triton_backends(home)
    model_repository(settings).create()
    url = f"http://{bind}:{triton.http_port}"
    venv_bin = str(Path(sys.executable).parent)
    return ChildSpec(
        name="triton",
        argv=[
            str(binary),
            f"--model-repository={settings.triton_repository_location}",
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            # radloop writes every config.pbtxt in full; with auto-completion on, the python
            # backend starts an extra stub per version just to ask model.py for a config,
            # which doubled the time a hot reload takes (docs/benchmarks.md).
            "--disable-auto-complete-config",
            f"--http-port={triton.http_port}",
            f"--grpc-port={triton.grpc_port}",
            f"--metrics-port={triton.metrics_port}",
            f"--http-address={bind}",
            f"--grpc-address={bind}",
            "--allow-metrics=true",
            "--log-verbose=0",
        ],
        log_file=settings.data_dir / "logs" / "triton.log",
        healthy=http_ok(f"{url}/v2/health/ready"),
        url=url,
        env={
            "LD_LIBRARY_PATH": str(libraries),
            # The python backend's stub finds its interpreter as `python3` on PATH: put this
            # venv's first so models import the venv's torch.
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            **settings.object_store.environment(),  # its S3 credentials, region and endpoint
        },
        ports=[triton.http_port, triton.grpc_port, triton.metrics_port],
        start_timeout=60.0,
    )


def worker_spec(settings: Settings, queue: WorkerQueue) -> ChildSpec:
    """`radloop worker --queue annotate` (child `worker`: drafts studies warm) or `--queue
    train` (child `trainer`: the work-pool worker that runs retraining and registers its
    deployment), healthy once it reports in."""
    from flows.process import this_host

    api = settings.prefect.effective_api_url
    name = "worker" if queue is WorkerQueue.ANNOTATE else "trainer"
    return ChildSpec(
        name=name,
        argv=[str(Path(sys.executable).with_name("radloop")), "worker", "--queue", queue.value],
        log_file=settings.data_dir / "logs" / f"{name}.log",
        healthy=worker_connected(settings, queue, this_host()),
        url=f"{api.removesuffix('/api')}/runs",
        env={
            "PREFECT_HOME": str(settings.data_dir / "prefect-client"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        },
        start_timeout=120.0,
        after=("prefect", "triton") if queue is WorkerQueue.ANNOTATE else ("prefect", "mlflow"),
    )


def review_spec(settings: Settings) -> ChildSpec:
    """`radloop review serve`: worklist, REST API, OHIF and the DICOMweb proxy."""
    return ChildSpec(
        name="review",
        argv=[str(Path(sys.executable).with_name("radloop")), "review", "serve"],
        log_file=settings.data_dir / "logs" / "review.log",
        healthy=http_ok(f"{settings.review.local_url}/api/health"),
        url=settings.review.base_url,
        ports=[settings.review.port],
        start_timeout=60.0,
    )
