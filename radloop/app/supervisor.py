"""Child processes radloop starts and stops itself: Orthanc, the Prefect server, ...

Each child has a command, an environment, a log file under the data dir and a health probe.
`Supervisor` starts children in order, waits for each to be healthy, restarts one that dies,
and stops all of them (SIGTERM, then SIGKILL) on shutdown — tests use the same children.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from radloop.settings import Settings

log = logging.getLogger(__name__)

ORTHANC_BINARY = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def http_ok(url: str) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            return httpx.get(url, timeout=2.0).status_code < 400
        except httpx.HTTPError:
            return False

    return probe


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


class Child:
    """One running child process with its log file."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        self.spec.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spec.log_file, "ab") as out:
            self.process = subprocess.Popen(
                self.spec.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.spec.env},
                start_new_session=True,  # Ctrl-C reaches radloop, which stops children in order
            )
        log.info("started %s (pid %d)", self.spec.name, self.process.pid)

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.spec.start_timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.spec.name} exited with {self.returncode()} during start-up; "
                    f"see {self.spec.log_file}"
                )
            if self.spec.healthy():
                time.sleep(0.25)
                if self.alive():  # not another process answering on the same port
                    return
                continue
            time.sleep(0.25)
        raise RuntimeError(f"{self.spec.name} not healthy after {self.spec.start_timeout:.0f} s")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        log.info("stopped %s", self.spec.name)

    def kill(self) -> None:
        """SIGKILL, no goodbye: for tests that check what survives a crash."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


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
            # venv's first so models import the venv's torch and MONAI.
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        },
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
        start_timeout=60.0,
    )


class Supervisor:
    """Starts children in order, restarts any that die, stops all in reverse order."""

    def __init__(self, specs: list[ChildSpec]) -> None:
        self.children = [Child(spec) for spec in specs]

    def start(self) -> None:
        for child in self.children:
            child.start()
            child.wait_healthy()
            if child.spec.after_start is not None:
                child.spec.after_start()

    def watch(self, stop: threading.Event, interval: float = 2.0) -> None:
        while not stop.wait(interval):
            for child in self.children:
                if not child.alive():
                    log.error("%s exited with %s; restarting", child.spec.name, child.returncode())
                    try:
                        child.start()
                        child.wait_healthy()
                        if child.spec.after_start is not None:
                            child.spec.after_start()
                    except Exception as error:
                        log.error("%s did not come back: %s", child.spec.name, error)

    def stop(self) -> None:
        for child in reversed(self.children):
            with contextlib.suppress(ProcessLookupError):
                child.stop()
