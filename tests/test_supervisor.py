"""The supervisor on small real children: backoff, giving up, ports held by strangers, and
cleaning up after a supervisor that was killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from radloop.app.probes import http_ok
from radloop.app.runstate import state_file
from radloop.app.supervisor import ChildSpec, Supervisor, SupervisorError
from radloop.settings import Settings, SupervisorSettings
from radloop.wait import wait_until
from tests.conftest_marks import ONCE
from tests.servers import free_port, radloop_json

# A child that serves HTTP on PORT; with EXIT_AFTER it exits 3 that many seconds later; with
# STUBBORN it ignores SIGTERM.
SERVER = """
import os, signal, sys, threading, http.server
if os.environ.get("STUBBORN"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
server = http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])),
                                http.server.SimpleHTTPRequestHandler)
if os.environ.get("EXIT_AFTER"):
    threading.Timer(float(os.environ["EXIT_AFTER"]), lambda: os._exit(3)).start()
server.serve_forever()
"""


def server_spec(tmp_path: Path, name: str, port: int, **env: str) -> ChildSpec:
    return ChildSpec(
        name=name,
        argv=[sys.executable, "-c", SERVER],
        log_file=tmp_path / "logs" / f"{name}.log",
        healthy=http_ok(f"http://127.0.0.1:{port}/"),
        url=f"http://127.0.0.1:{port}",
        env={"PORT": str(port), **env},
        ports=[port],
        start_timeout=20,
    )


@ONCE  # processes only: nothing database-specific
def test_a_crash_looping_child_is_restarted_later_each_time_then_given_up_and_shown_failed(
    settings: Settings, radloop_env: dict[str, str], tmp_path: Path
) -> None:
    # Named as the review service, so `radloop status` has a probe for it too.
    spec = server_spec(tmp_path, "review", settings.review.port, EXIT_AFTER="0.5")
    policy = SupervisorSettings(restart_backoff_seconds=0.5, max_backoff_seconds=2, restart_limit=3)
    supervisor = Supervisor([spec], policy, state_file(settings))
    stop = threading.Event()
    supervisor.start()
    watching = threading.Thread(target=supervisor.watch, args=(stop, 0.05))
    watching.start()
    try:
        tending = supervisor.tending["review"]
        wait_until(lambda: tending.state == "failed", timeout=60)
        # Started once, restarted 3 times, each after twice the delay before: 0.5, 1, 2 s.
        assert len(tending.starts) == 4
        gaps = [b - a for a, b in zip(tending.starts, tending.starts[1:], strict=False)]
        assert gaps[0] >= 0.5 + 0.5 and gaps[1] >= 0.5 + 1 and gaps[2] >= 0.5 + 2, gaps

        status = radloop_json(radloop_env, "status", exit_codes=(1,))
        (review,) = [s for s in status["services"] if s["name"] == "review"]
        assert review["healthy"] is False
        assert review["supervised"]["state"] == "failed"
        assert "exited 4 times in a row (last exit status 3)" in review["detail"]
        assert "stopped restarting" in review["detail"]
        # Given up means given up: nothing starts it again.
        stop.wait(2.5)
        assert len(tending.starts) == 4 and not supervisor.children[0].alive()
    finally:
        stop.set()
        watching.join()
        supervisor.stop()


@ONCE  # processes only: nothing database-specific
def test_a_port_held_by_another_process_stops_the_start_and_names_the_holder(
    tmp_path: Path,
) -> None:
    port = free_port()
    stranger = subprocess.Popen(
        [sys.executable, "-c", SERVER], env={**os.environ, "PORT": str(port)}
    )
    try:
        wait_until(http_ok(f"http://127.0.0.1:{port}/"), timeout=20)
        supervisor = Supervisor([server_spec(tmp_path, "orthanc", port)])
        with pytest.raises(SupervisorError) as refused:
            supervisor.start()
        message = str(refused.value)
        assert f"port {port} is held by pid {stranger.pid}" in message
        assert "orthanc cannot start" in message
        assert supervisor.children[0].pid is None  # it never started one of its own
    finally:
        stranger.kill()
        stranger.wait()


@ONCE  # processes only: nothing database-specific
def test_children_of_a_killed_supervisor_are_ended_by_the_next_start(
    settings: Settings, tmp_path: Path
) -> None:
    """A child that ignores SIGTERM survives its guard's grace period after the supervisor's
    death; the next supervisor on the data dir finds it in the record and ends it."""
    port = free_port()
    program = f"""
import sys, threading
sys.path.insert(0, {str(Path.cwd())!r})
from pathlib import Path
from radloop.app.supervisor import Supervisor
from tests.test_supervisor import server_spec
spec = server_spec(Path({str(tmp_path)!r}), "mlflow", {port}, STUBBORN="1")
supervisor = Supervisor([spec], record=Path({str(state_file(settings))!r}))
supervisor.start()
print("up", flush=True)
threading.Event().wait()
"""
    first = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    assert first.stdout is not None and first.stdout.readline() == "up\n"
    leftover = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
    assert leftover.status_code == 200
    first.send_signal(signal.SIGKILL)
    first.wait()

    second = Supervisor([server_spec(tmp_path, "mlflow", port)], record=state_file(settings))
    ended = second.clean_leftovers()
    assert len(ended) == 1 and ended[0].startswith("mlflow (pid ")
    second.start()  # the port is free again: the start does not meet the leftover
    try:
        assert second.children[0].alive()
    finally:
        second.stop()
    assert not state_file(settings).exists()


@ONCE  # processes only: nothing database-specific
def test_parts_start_together_each_after_the_parts_it_needs_and_a_failed_start_says_why(
    tmp_path: Path,
) -> None:
    # `slow` answers 3 s after it starts (a slow import); `needs_slow` must wait for it;
    # `other` needs nothing and is up long before `slow`.
    slow_port, needs_port, other_port = free_port(), free_port(), free_port()
    slow = server_spec(tmp_path, "slow", slow_port)
    slow.argv = [sys.executable, "-c", "import time; time.sleep(3)\n" + SERVER]
    needs_slow = server_spec(tmp_path, "needs_slow", needs_port)
    needs_slow.after = ("slow", "not-run-here")  # parts this supervisor does not run are ignored
    other = server_spec(tmp_path, "other", other_port)
    supervisor = Supervisor([slow, needs_slow, other])
    try:
        supervisor.start()
        starts = {name: tending.starts[0] for name, tending in supervisor.tending.items()}
        assert starts["other"] - starts["slow"] < 1.0  # together, not one after another
        assert starts["needs_slow"] - starts["slow"] >= 3.0  # once `slow` answered
        assert all(child.alive() for child in supervisor.children)
    finally:
        supervisor.stop()

    # A part that exits during start-up: radloop up says so with the end of its log.
    broken = server_spec(tmp_path, "broken", free_port())
    broken.argv = [sys.executable, "-c", "raise SystemExit('spec phantom: network: no such')"]
    supervisor = Supervisor([broken, server_spec(tmp_path, "fine", free_port())])
    try:
        with pytest.raises(SupervisorError) as refused:
            supervisor.start()
    finally:
        supervisor.stop()
    assert "broken exited with 1 during start-up" in str(refused.value)
    assert "spec phantom: network: no such" in str(refused.value)
    assert not any(child.alive() for child in supervisor.children)
