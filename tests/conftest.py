"""Fixtures: each test gets its own data dir, database, ports — and real peers it starts."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from radloop.app.supervisor import (
    Child,
    ChildSpec,
    mlflow_spec,
    orthanc_spec,
    prefect_spec,
    review_spec,
    triton_spec,
)
from radloop.db import Store
from radloop.settings import Settings, load_settings
from tests.review_cases import review  # noqa: F401  (the review tests' fixture)
from tests.servers import PostgresServer, RadloopProcess, S3Server, free_port

BACKEND = os.environ.get("RADLOOP_TEST_DATABASE", "sqlite")
# Fixtures that start a real server process: a test using one is `slow` (make test-fast skips
# it). Tests that start processes themselves carry the mark in their module.
SERVER_FIXTURES = {
    "orthanc",
    "triton",
    "review_service",
    "mlflow_server",
    "listener",
    "prefect_server",
}


NO_DATABASE = pytest.mark.skip(reason="touches no database: runs in the SQLite pass")


def pytest_configure(config: pytest.Config) -> None:
    """Refuse a pytest that pytest-xdist's --dist loadgroup cannot group with: its workers
    would run the whole-stack tests beside each other, and nothing else would say so."""
    from importlib.metadata import version

    from packaging.version import Version

    if config.getoption("dist", "no") != "loadgroup":
        return
    if Version(version("pytest")) >= Version("9.2") and Version(version("pytest-xdist")) <= Version(
        "3.8.0"
    ):
        raise pytest.UsageError(
            "pytest >= 9.2 node ids no longer take pytest-xdist <= 3.8's group suffix, so "
            "--dist loadgroup would not group (pytest-xdist#1386): install the dev extras' pins"
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if SERVER_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)
        # The PostgreSQL pass is for what touches radloop's database (`database_url` is
        # behind `radloop_env`, `settings` and `store`); the rest would only run twice.
        if (
            BACKEND == "postgresql"
            and "database_url" not in fixtures
            and "postgres" not in fixtures
        ):
            item.add_marker(NO_DATABASE)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer | None]:
    if BACKEND != "postgresql":
        yield None
        return
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="radloop-pg-")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def database_url(postgres: PostgresServer | None, tmp_path: Path) -> str:
    if postgres is None:
        return f"sqlite:///{tmp_path / 'data' / 'radloop.db'}"
    return postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture
def radloop_env(
    tmp_path: Path,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> dict[str, str]:
    """Environment of a radloop process for this test; also applied to this test process.
    A test marked `object_store` keeps the model repository, datasets, Prefect's task storage
    and MLflow's artifacts in a bucket of its own on `s3_server` (named by `bucket` below)."""
    for key in list(os.environ):
        if key.startswith("RADLOOP_"):
            monkeypatch.delenv(key)
    values = {
        "RADLOOP_DATA_DIR": str(tmp_path / "data"),
        "RADLOOP_DATABASE_URL": database_url,
        "RADLOOP_DICOM__PORT": str(free_port()),
        "RADLOOP_DICOM__QUIET_SECONDS": "2",
        "RADLOOP_ORTHANC__HTTP_PORT": str(free_port()),
        "RADLOOP_ORTHANC__DICOM_PORT": str(free_port()),
        "RADLOOP_ORTHANC__STABLE_AGE_SECONDS": "1",
        "RADLOOP_ORTHANC__POLL_SECONDS": "0.3",
        "RADLOOP_PREFECT__PORT": str(free_port()),
        "RADLOOP_TRITON__HTTP_PORT": str(free_port()),
        "RADLOOP_TRITON__GRPC_PORT": str(free_port()),
        "RADLOOP_TRITON__METRICS_PORT": str(free_port()),
        "RADLOOP_DEMO_ON_FIRST_RUN": "false",
        "RADLOOP_REVIEW__PORT": str(free_port()),
        "RADLOOP_MLFLOW__PORT": str(free_port()),
        "RADLOOP_WATCH__SETTLE_SECONDS": "0.5",
        "RADLOOP_OUTBOX__POLL_SECONDS": "0.2",
        "RADLOOP_OUTBOX__MAX_BACKOFF_SECONDS": "1",
    }
    if request.node.get_closest_marker("object_store"):
        server: S3Server = request.getfixturevalue("s3_server")
        values.update(server.bucket(bucket(request.node)))
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, "TCP_NODELAY": "1", **values}


def bucket(node: pytest.Item) -> str:
    """The bucket of an `object_store` test: a valid S3 name from the test's."""
    return f"t-{uuid.uuid5(uuid.NAMESPACE_URL, node.nodeid).hex}"


@pytest.fixture
def settings(radloop_env: dict[str, str]) -> Settings:
    return load_settings()


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    store = Store.open(settings.effective_database_url)
    yield store
    store.close()


@pytest.fixture
def listener(radloop_env: dict[str, str]) -> Iterator[RadloopProcess]:
    """`radloop listen` running as its own process."""
    process = RadloopProcess(radloop_env).start()
    yield process
    process.stop()


def _running(spec: ChildSpec) -> Iterator[Child]:
    child = Child(spec)
    child.start()
    child.wait_healthy()
    yield child
    child.stop()


@pytest.fixture
def orthanc(settings: Settings) -> Iterator[Child]:
    """A real Orthanc (Debian package) whose modality `radloop` is this test's listener."""
    yield from _running(orthanc_spec(settings))


@pytest.fixture
def triton(settings: Settings) -> Iterator[Child]:
    """Triton from the nvidia-pytriton wheel on this test's model repository."""
    yield from _running(triton_spec(settings))


@pytest.fixture
def review_service(settings: Settings, orthanc: Child) -> Iterator[Child]:
    """`radloop review serve` as its own process, proxying this test's Orthanc."""
    yield from _running(review_spec(settings))


@pytest.fixture
def mlflow_server(settings: Settings) -> Iterator[Child]:
    """`mlflow server` on SQLite under this test's data dir."""
    yield from _running(mlflow_spec(settings))


@pytest.fixture
def prefect_server(settings: Settings) -> Iterator[Child]:
    """A Prefect server (SQLite under this test's data dir); this process's Prefect client
    talks to it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: settings.prefect.effective_api_url}):
        yield from _running(prefect_spec(settings))
