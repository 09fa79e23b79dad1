"""The radloop image without building it: the Dockerfiles pass hadolint, install what
pyproject.toml pins in the order TOOLCHAIN asks, carry what the settings point at; the wheel
`pip install .` makes holds every file of the packages; the image's health check says
healthy and unhealthy when it should; the PostgreSQL init script makes each database."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from radloop.settings import OHIF_VERSION
from tests import deploy_files as d
from tests.servers import PG_BIN, PostgresServer, free_port

PACKAGES = ["radloop", "dicom_listener", "agents", "flows", "model_registry"]


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), " ".join(rest.split())))
    return found


def _args(dockerfile: Path) -> dict[str, str]:
    return dict(
        rest.partition("=")[::2] for keyword, rest in _instructions(dockerfile) if keyword == "ARG"
    )


def _pins() -> dict[str, str]:
    project = tomllib.loads((d.ROOT / "pyproject.toml").read_text())["project"]
    pins = [re.split(r"\[|==", spec) for spec in project["dependencies"]]
    return {
        parts[0].lower(): spec.split("==")[1]
        for parts, spec in zip(pins, project["dependencies"], strict=True)
    }


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    config = d.ROOT / "deploy" / "docker" / "hadolint.yaml"
    result = subprocess.run(
        [
            str(hadolint),
            "--no-color",
            "--config",
            str(config),
            str(d.DOCKERFILE),
            str(d.TRITON_DOCKERFILE),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_installs_pinned_torch_before_radloop() -> None:
    steps = _instructions(d.DOCKERFILE)
    args = _args(d.DOCKERFILE)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    assert args["TORCH_VERSION"] == _pins()["torch"]
    runs = [rest for keyword, rest in steps if keyword == "RUN"]
    torch = next(i for i, run in enumerate(runs) if 'pip install "torch==${TORCH_VERSION}"' in run)
    project = next(i for i, run in enumerate(runs) if run.startswith("pip install ."))
    assert torch < project
    [entrypoint] = [json.loads(rest) for keyword, rest in steps if keyword == "ENTRYPOINT"]
    assert entrypoint[-1] == "radloop"
    [user] = [rest for keyword, rest in steps if keyword == "USER"]
    assert user.split(":")[0].isdigit()  # Kubernetes checks runAsNonRoot only on a uid


def test_triton_image_loads_models_with_radloops_torch_and_no_monai() -> None:
    [run] = [rest for keyword, rest in _instructions(d.TRITON_DOCKERFILE) if keyword == "RUN"]
    for package in ("torch", "numpy"):
        assert f'"{package}=={_pins()[package]}"' in run
    assert "monai" not in run  # model.py imports numpy and torch only


def test_image_ohif_release_is_the_one_bootstrap_and_settings_name() -> None:
    bootstrap = (d.ROOT / "scripts" / "bootstrap").read_text()
    args = _args(d.DOCKERFILE)
    assert args["OHIF_VERSION"] == OHIF_VERSION
    assert f"OHIF_VERSION={OHIF_VERSION}\n" in bootstrap
    assert f'OHIF_INTEGRITY="{args["OHIF_INTEGRITY"]}"' in bootstrap


def test_image_settings_point_at_what_the_image_holds() -> None:
    steps = _instructions(d.DOCKERFILE)
    env: dict[str, str] = {}
    for keyword, rest in steps:
        if keyword == "ENV":
            env |= dict(pair.split("=", 1) for pair in rest.split())
    copies = {rest.split()[-1]: rest.split()[-2] for keyword, rest in steps if keyword == "COPY"}
    radloop = {k: v for k, v in env.items() if k.startswith("RADLOOP_")}
    assert sorted(k for k in radloop if not d.is_setting(k)) == []
    assert copies["/opt/radloop/configs"] == "configs"
    config = Path(env["RADLOOP_CONFIG"]).relative_to("/opt/radloop")
    models = Path(env["RADLOOP_MODELS_DIR"]).relative_to("/opt/radloop")
    assert (d.ROOT / config).is_file() and any((d.ROOT / models).glob("*.yaml"))
    assert copies[env["RADLOOP_REVIEW__OHIF_DIR"]] == "/ohif"
    assert env["RADLOOP_DATA_DIR"] == d.DATA_DIR
    assert env["RADLOOP_TRITON__REPOSITORY"] == d.MODEL_REPOSITORY
    assert "PREFECT_LOCAL_STORAGE_PATH" not in env  # derived from the shared dir
    assert copies["/usr/local/bin/radloop-healthcheck"] == "deploy/docker/healthcheck.py"


def test_dockerignore_admits_exactly_what_the_dockerfile_copies() -> None:
    lines = [x for x in (d.ROOT / ".dockerignore").read_text().splitlines() if x and x[0] != "#"]
    assert lines[0] == "*"  # an allow-list: no .venv, .git, data dir or secrets in the context
    admitted = {x.removeprefix("!").rstrip("/") for x in lines if x.startswith("!")}
    sources = {
        source.rstrip("/")
        for keyword, rest in _instructions(d.DOCKERFILE)
        if keyword == "COPY" and "--from=" not in rest
        for source in rest.split()[:-1]
        if not source.startswith("--")
    }
    assert sources == admitted
    assert all((d.ROOT / source).exists() for source in sources)


def test_wheel_carries_every_file_of_the_packages(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(d.ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in PACKAGES:
        shutil.copytree(d.ROOT / package, source / package, ignore=ignore)
    out = tmp_path / "out"
    wheel_command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps"]
    # No build isolation: setuptools from the venv, nothing fetched.
    subprocess.run(
        [*wheel_command, "--no-build-isolation", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    [wheel] = out.glob("radloop-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [entry_points] = [n for n in names if n.endswith("entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    files = {
        str(p.relative_to(source))
        for package in PACKAGES
        for p in (source / package).rglob("*")
        if p.is_file()
    }
    assert sorted(files - names) == []
    assert "radloop = radloop.app.cli:main" in scripts


# --- the image's health check ------------------------------------------------------------


def _healthcheck() -> ModuleType:
    path = d.ROOT / "deploy" / "docker" / "healthcheck.py"
    spec = importlib.util.spec_from_file_location("radloop_healthcheck", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def health_server() -> Iterator[str]:
    """An HTTP server answering 200 on */health and 503 elsewhere."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path.endswith("/health") else 503)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_healthcheck_http_follows_the_status(health_server: str) -> None:
    check = _healthcheck()
    assert check.main(["http", f"{health_server}/api/health"]) == 0
    assert check.main(["http", f"{health_server}/elsewhere"]) == 1
    assert check.main(["http", f"http://127.0.0.1:{free_port()}/api/health"]) == 1
    assert check.main(["bogus"]) == 2


def test_worker_is_unhealthy_while_the_prefect_api_is_away(
    radloop_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, health_server: str
) -> None:
    check = _healthcheck()
    monkeypatch.setenv("RADLOOP_PREFECT__API_URL", f"http://127.0.0.1:{free_port()}/api")
    assert check.main(["worker"]) == 1
    monkeypatch.setenv("RADLOOP_PREFECT__API_URL", f"{health_server}/api")
    assert check.main(["worker"]) == 0


def test_gateway_is_unhealthy_when_nothing_answers_dicom(radloop_env: dict[str, str]) -> None:
    assert _healthcheck().main(["dicom"]) == 1


# --- PostgreSQL ----------------------------------------------------------------------------


@pytest.mark.skipif(
    os.environ.get("RADLOOP_TEST_DATABASE") != "postgresql",
    reason="needs the PostgreSQL the PostgreSQL pass starts",
)
def test_postgres_init_script_makes_a_database_per_service(
    postgres: PostgresServer | None,
) -> None:
    assert postgres is not None
    env = {
        **os.environ,
        "PATH": f"{PG_BIN}{os.pathsep}{os.environ['PATH']}",
        "PGHOST": "127.0.0.1",
        "PGPORT": str(postgres.port),
        "POSTGRES_USER": "postgres",
    }
    secrets = d.read_env_file(d.COMPOSE_ENV)
    env |= {k: f"pw-{k}-'quoted'" for k in secrets if k.startswith("PG_")}
    subprocess.run(["bash", str(d.POSTGRES_INIT)], env=env, check=True, capture_output=True)
    owners = subprocess.run(
        [
            str(PG_BIN / "psql"),
            "-U",
            "postgres",
            "-Atc",
            "SELECT datname || '=' || pg_get_userbyid(datdba) FROM pg_database",
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert {"radloop=radloop", "prefect=prefect", "mlflow=mlflow", "orthanc=orthanc"} <= set(owners)
