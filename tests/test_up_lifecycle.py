"""`radloop up` ends as users end it — killed, its terminal closed, its output pipe gone — and
takes every part it started with it; the next start on the data dir is healthy. A port some
other process holds stops the start with that process named, instead of adopting it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from radloop.app import runstate
from radloop.app.supervisor import port_holder
from radloop.settings import Settings
from radloop.wait import wait_until
from tests.conftest_marks import ONCE
from tests.servers import RADLOOP, RadloopProcess, dicom_echo, radloop_json

# Each test runs `radloop up`; nothing in them is database-specific.
pytestmark = [pytest.mark.slow, ONCE]


def children(settings: Settings) -> dict[str, int]:
    """The process groups of the parts the running `radloop up` started."""
    record = runstate.read(runstate.state_file(settings))
    assert record is not None
    found = {name: child["pid"] for name, child in record["children"].items() if child["pid"]}
    assert set(found) == {"orthanc", "prefect", "mlflow", "triton", "flows", "review"}, record
    return found


def group_alive(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        return True
            except (ProcessLookupError, FileNotFoundError):
                pass
    return False


def assert_all_ended(groups: dict[str, int]) -> None:
    def left() -> list[str]:
        return [name for name, pgid in groups.items() if group_alive(pgid)]

    wait_until(lambda: not left(), timeout=60, what="every part ended")


@pytest.mark.timeout(900)
def test_parts_die_with_radloop_up_killed_or_hung_up_with_its_output_gone_and_it_starts_again(
    radloop_env: dict[str, str], settings: Settings
) -> None:
    # 1. SIGKILL: no goodbye at all. Only radloop itself is killed, not its guard's group.
    up = RadloopProcess(radloop_env, command=("up", "--no-demo")).start(timeout=300)
    parts = children(settings)
    command = up.process.command_pid
    assert command is not None
    os.kill(command, signal.SIGKILL)
    assert_all_ended(parts)

    # 2. The next start on the same data dir is healthy, on processes of its own. It runs as
    # `radloop up | tee log` does; then the terminal closes: tee is gone first, and radloop
    # gets SIGHUP with nobody reading its output.
    errors = Path(radloop_env["RADLOOP_DATA_DIR"]) / "up-stderr.log"
    with open(errors, "wb") as stderr:
        piped = subprocess.Popen(
            [RADLOOP, "up", "--no-demo"],
            env=radloop_env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        port = int(radloop_env["RADLOOP_DICOM__PORT"])
        wait_until(lambda: piped.poll() is None and dicom_echo(port), timeout=300)
        services = radloop_json(radloop_env, "status")["services"]
        assert all(s["healthy"] for s in services), services
        parts = children(settings)
        assert {s["name"] for s in services if "supervised" in s} == set(parts)
        assert piped.stdout is not None
        piped.stdout.close()
        piped.send_signal(signal.SIGHUP)
        assert_all_ended(parts)
        assert piped.wait(60) == 0, errors.read_text()
    finally:
        if piped.poll() is None:
            os.killpg(piped.pid, signal.SIGKILL)


def test_a_port_held_by_another_process_stops_radloop_up_naming_the_holder(
    radloop_env: dict[str, str], settings: Settings
) -> None:
    port = settings.orthanc.http_port
    stranger = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_holder(port), timeout=20)
        result = subprocess.run(
            [RADLOOP, "up", "--no-demo"],
            env={**radloop_env, "COLUMNS": "300"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        stranger.kill()
        stranger.wait()
    assert result.returncode == 1, result.stdout + result.stderr
    said = result.stdout + result.stderr
    assert f"port {port} is held by pid {stranger.pid}" in said, said
    assert "http.server" in said
    assert not runstate.state_file(settings).exists()
