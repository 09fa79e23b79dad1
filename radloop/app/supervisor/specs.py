"""What `radloop up` runs as child processes — Orthanc, the Prefect server, MLflow, Triton,
the flow runner and the review service — each as a `ChildSpec`: command, environment, log
file under the data dir, the ports it must own and the probe that says it is healthy."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from radloop.app.probes import http_ok
from radloop.settings import Settings

ORTHANC_BINARY = "/usr/sbin/Orthanc"
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


def orthanc_spec(settings: Settings, radloop_port: int | None = None) -> ChildSpec:
    """An Orthanc with DICOMweb, its storage under `<data_dir>/orthanc`, HTTP on loopback."""
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
        "RemoteAccessAllowed": False,
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
    url = f"http://127.0.0.1:{orthanc.http_port}"
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


def prefect_spec(settings: Settings) -> ChildSpec:
    """A local Prefect server (SQLite under `<data_dir>/prefect`), UI and API on loopback."""
    home = settings.data_dir / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    port = settings.prefect.port
    prefect = str(Path(sys.executable).with_name("prefect"))
    return ChildSpec(
        name="prefect",
        argv=[prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        log_file=settings.data_dir / "logs" / "prefect.log",
        healthy=http_ok(f"http://127.0.0.1:{port}/api/health"),
        url=f"http://127.0.0.1:{port}",
        env={
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        },
        ports=[port],
        start_timeout=120.0,
    )


def mlflow_spec(settings: Settings) -> ChildSpec:
    """`mlflow server`: tracking and registry on SQLite, artifacts served from a folder, both
    under `<data_dir>/mlflow`; UI and API on loopback."""
    home = settings.data_dir / "mlflow"
    (home / "artifacts").mkdir(parents=True, exist_ok=True)
    port = settings.mlflow.port
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    return ChildSpec(
        name="mlflow",
        argv=[
            mlflow,
            "server",
            "--backend-store-uri",
            f"sqlite:///{home / 'mlflow.db'}",
            "--artifacts-destination",
            str(home / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        log_file=settings.data_dir / "logs" / "mlflow.log",
        healthy=http_ok(f"http://127.0.0.1:{port}/health"),
        url=f"http://127.0.0.1:{port}",
        env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"},
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


def triton_spec(settings: Settings) -> ChildSpec:
    """Triton Inference Server from the nvidia-pytriton wheel, explicit model control, on the
    repository radloop manages. Models are loaded by radloop, never by polling."""
    triton = settings.triton
    home = settings.data_dir / "triton"
    binary, libraries, backends = _prepare_triton_backends(home)
    repository = settings.model_repository
    repository.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{triton.http_port}"
    venv_bin = str(Path(sys.executable).parent)
    return ChildSpec(
        name="triton",
        argv=[
            str(binary),
            f"--model-repository={repository}",
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            # radloop writes every config.pbtxt in full; with auto-completion on, the python
            # backend starts an extra stub per version just to ask model.py for a config,
            # which doubled the time a hot reload takes (docs/benchmarks.md).
            "--disable-auto-complete-config",
            f"--http-port={triton.http_port}",
            f"--grpc-port={triton.grpc_port}",
            f"--metrics-port={triton.metrics_port}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
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
        },
        ports=[triton.http_port, triton.grpc_port, triton.metrics_port],
        start_timeout=60.0,
    )


def flows_spec(settings: Settings) -> ChildSpec:
    """`radloop flows serve`: radloop's Prefect deployments, healthy once registered."""
    api = settings.prefect.effective_api_url
    return ChildSpec(
        name="flows",
        argv=[str(Path(sys.executable).with_name("radloop")), "flows", "serve"],
        log_file=settings.data_dir / "logs" / "flows.log",
        healthy=http_ok(f"{api}/deployments/name/annotate-study/on-study-completed"),
        url=f"{api.removesuffix('/api')}/deployments",
        env={
            "PREFECT_API_URL": api,
            "PREFECT_HOME": str(settings.data_dir / "prefect-client"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # The runner polls for scheduled runs every 10 s by default; triggered annotation
            # runs then waited ~7 s (p50) to be picked up. 1 s: 0.4 s (bench/annotate.py).
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        },
        start_timeout=120.0,
    )


def review_spec(settings: Settings) -> ChildSpec:
    """`radloop review serve`: worklist, REST API, OHIF and the DICOMweb proxy."""
    base = f"http://{settings.review.host}:{settings.review.port}"
    return ChildSpec(
        name="review",
        argv=[str(Path(sys.executable).with_name("radloop")), "review", "serve"],
        log_file=settings.data_dir / "logs" / "review.log",
        healthy=http_ok(f"{base}/api/health"),
        url=settings.review.base_url,
        ports=[settings.review.port],
        start_timeout=60.0,
    )
