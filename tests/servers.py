"""Real peers for tests, started and stopped by the tests: PostgreSQL, the radloop listener.

Orthanc and Prefect come from `radloop.app.supervisor`, the same code `radloop up` uses.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
from pynetdicom import AE

from radloop.app.supervisor import ChildProcess
from radloop.wait import wait_until

PG_BIN = Path("/usr/lib/postgresql/15/bin")
RADLOOP = str(Path(sys.executable).with_name("radloop"))


_GIVEN: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, and not one this test process handed out before (the
    kernel may give a released port again: two of one test's servers once got the same)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def dicom_echo(port: int, called: str = "RADLOOP", calling: str = "ECHOSCU") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification SOP Class
    ae.acse_timeout = ae.network_timeout = 3
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status and status.Status == 0)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class PostgresServer:
    """A throw-away PostgreSQL 15 cluster in a temporary directory, on a free port."""

    def __init__(
        self,
        root: Path,
        host: str = "127.0.0.1",
        on: Callable[[Sequence[str]], list[str]] | None = None,
        network: str | None = None,
    ) -> None:
        """`on` wraps the server's command (another test host's namespace); `network` is
        trusted as well as loopback."""
        self.root = root
        self.data = root / "pgdata"
        self.host = host
        self.port = free_port()
        self.on = on or list
        self.network = network
        self.process: ChildProcess | None = None
        # PostgreSQL refuses to run as root; CI runs as root, so use the `postgres` account.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.as_user:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            [
                *self.as_user,
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
        )
        if self.network is not None:
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {self.network} trust\n")
        self.resume()

    def resume(self) -> None:
        """Start the server on its data dir: after `kill`, it recovers from its WAL first."""
        self.process = ChildProcess(
            "postgres",
            self.on(
                [
                    *self.as_user,
                    str(PG_BIN / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-h",
                    self.host,
                    "-k",
                    str(self.root),
                    "-c",
                    "fsync=on",
                    "-c",
                    "max_connections=200",
                ]
            ),
        )
        self.process.start()
        wait_until(self._ready, timeout=60)

    def kill(self) -> None:
        """kill -9 of the postmaster and every backend, in the middle of whatever they do (as
        the OOM killer would). The postmaster's parent (runuser, or the guard) reaps it, so no
        process keeps the PID its lock file names and `resume` can start again."""
        postmaster = psutil.Process(int((self.data / "postmaster.pid").read_text().split()[0]))
        for process in [postmaster, *postmaster.children(recursive=True)]:
            process.kill()
        wait_until(lambda: not psutil.pid_exists(postmaster.pid), timeout=30, what="reaped")

    def _ready(self) -> bool:
        probe = subprocess.run(
            [str(PG_BIN / "pg_isready"), "-h", self.host, "-p", str(self.port)],
            capture_output=True,
        )
        return probe.returncode == 0

    def create_database(self, name: str) -> str:
        subprocess.run(
            [
                "psql",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-c",
                f'CREATE DATABASE "{name}"',
            ],
            check=True,
            capture_output=True,
        )
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{name}"

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(signal.SIGINT, timeout=30)  # fast shutdown
        shutil.rmtree(self.root, ignore_errors=True)


class RadloopProcess:
    """`radloop <command>` as a real child process, so tests can SIGKILL it."""

    def __init__(
        self, env: dict[str, str], command: Sequence[str] = ("listen",), name: str | None = None
    ) -> None:
        self.env = env
        self.command = list(command)
        self.name = name or self.command[0]
        self.log = Path(env["RADLOOP_DATA_DIR"]) / f"radloop-{self.name}.log"
        self.process = ChildProcess(f"radloop {self.name}", [RADLOOP, *command], env, self.log)

    @property
    def pid(self) -> int | None:
        """The radloop command's process id (not its guard's)."""
        return self.process.command_pid

    def start(self, calling: str | None = "ECHOSCU", timeout: float = 60.0) -> RadloopProcess:
        """Start and wait until the SCP answers a C-ECHO from `calling` — or, with `calling`
        None (a TLS listener), until its port accepts connections."""
        self.process.start()
        port = int(self.env["RADLOOP_DICOM__PORT"])

        def ready() -> bool:
            if calling is None:
                return _accepts(port)
            return dicom_echo(port, calling=calling)

        wait_until(lambda: self._check_alive() and ready(), timeout=timeout)
        return self

    def launch(self) -> RadloopProcess:
        """Start without waiting for a DICOM port (a worker has none)."""
        self.process.start()
        return self

    def _check_alive(self) -> bool:
        if not self.process.alive():
            code = self.process.returncode()
            raise AssertionError(f"radloop exited with {code}:\n{self.output()}")
        return True

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        self.process.kill()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        return self.process.stop(sig, timeout)


def radloop_json(env: dict[str, str], *args: str, exit_codes: tuple[int, ...] = (0,)) -> Any:
    """Run a radloop CLI command with `--json` and return what it printed, parsed."""
    result = subprocess.run(
        [RADLOOP, *args, "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode in exit_codes, result.stderr + result.stdout
    return json.loads(result.stdout)


class S3Server:
    """moto's standalone S3 server (a real HTTP endpoint speaking the S3 API) on loopback, as
    the test's S3-compatible object storage; a bucket per test (`bucket`)."""

    ACCESS_KEY, SECRET = "radloop-test", "radloop-test-secret"

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        moto = str(Path(sys.executable).with_name("moto_server"))
        argv = [moto, "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = ChildProcess("s3", argv, log_file=root / "s3.log")

    def start(self) -> S3Server:
        self.process.start()
        wait_until(lambda: _accepts(self.port), timeout=60, what="moto's S3 server")
        return self

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET,
            region_name="us-east-1",
        )

    def bucket(self, name: str) -> dict[str, str]:
        """Create bucket `name`; radloop's settings (as environment) that put the object store
        in it."""
        self.client().create_bucket(Bucket=name)
        return {
            "RADLOOP_OBJECT_STORE__URL": f"s3://{name}/radloop",
            "RADLOOP_OBJECT_STORE__ENDPOINT_URL": self.endpoint,
            "RADLOOP_OBJECT_STORE__ACCESS_KEY_ID": self.ACCESS_KEY,
            "RADLOOP_OBJECT_STORE__SECRET_ACCESS_KEY": self.SECRET,
        }

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def stop(self) -> None:
        self.process.stop()


def self_signed_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A key and a self-signed certificate (PEM) for `name` at 127.0.0.1, made by openssl."""
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return key, cert
