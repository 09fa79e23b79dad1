"""`radloop up`'s supervision: start each child as soon as the parts it needs are healthy and
wait for it to be healthy on the process radloop started (never on whoever answers its port),
restart one that exits with a growing delay, give up on one that keeps exiting, stop all in
reverse order — and end what a killed `radloop up` left behind before starting again."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from radloop.app import runstate
from radloop.app.runstate import ChildState
from radloop.app.supervisor.process import ChildProcess
from radloop.app.supervisor.specs import ChildSpec
from radloop.settings import SupervisorSettings
from radloop.wait import wait_until

log = logging.getLogger(__name__)


class SupervisorError(RuntimeError):
    """A child could not be started; the message says which and why."""


def port_holder(port: int) -> str | None:
    """Who listens on `port` (loopback or all interfaces), in words; None when it is free."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return None
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="inet"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid is None:
                    return "a process of another user"
                process = psutil.Process(conn.pid)
                return f"pid {conn.pid} ({' '.join(process.cmdline())[:200]})"
    return "another process"


class Child:
    """One part of `radloop up`: its spec and the process running it."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.process = ChildProcess(spec.name, spec.argv, {**os.environ, **spec.env}, spec.log_file)
        self.started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def start(self) -> None:
        """Start the child; refuse when one of its ports is already held by someone else."""
        for port in self.spec.ports:
            holder = port_holder(port)
            if holder is not None:
                raise SupervisorError(
                    f"{self.spec.name} cannot start: port {port} is held by {holder}, not by "
                    f"a process this radloop started. Stop that process or give "
                    f"{self.spec.name} another port (see docs/operations.md)."
                )
        self.process.start()
        self.started_at = time.monotonic()

    def wait_healthy(self) -> None:
        wait_until(self.is_healthy, self.spec.start_timeout + 1, 0.25, f"{self.spec.name} healthy")

    def is_healthy(self) -> bool:
        """Whether the starting child is healthy yet; refuses one that exited or is late."""
        if not self.alive():
            raise SupervisorError(
                f"{self.spec.name} exited with {self.returncode()} during start-up; see "
                f"{self.spec.log_file}{_tail(self.spec.log_file)}"
            )
        if self.spec.healthy():
            return True
        if time.monotonic() - self.started_at > self.spec.start_timeout:
            raise SupervisorError(
                f"{self.spec.name} not healthy after {self.spec.start_timeout:.0f} s; "
                f"see {self.spec.log_file}{_tail(self.spec.log_file)}"
            )
        return False

    def alive(self) -> bool:
        return self.process.alive()

    def returncode(self) -> int | None:
        return self.process.returncode()

    def stop(self, timeout: float = 15.0) -> None:
        self.process.stop(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL, no goodbye: for tests that check what survives a crash."""
        self.process.kill()


@dataclass
class Tending:
    """What the supervisor knows of one child between restarts."""

    state: ChildState = ChildState.STARTING
    since: float = 0.0  # clock time of the last state change
    exits_in_a_row: int = 0
    restarts: int = 0
    last_exit: int | None = None
    restart_at: float = 0.0
    starts: list[float] = field(default_factory=list)


class Supervisor:
    """Starts children in order, restarts any that exit (backing off), stops all in reverse
    order. With a `record` path it keeps `radloop status` and the next start informed."""

    def __init__(
        self,
        specs: list[ChildSpec],
        policy: SupervisorSettings | None = None,
        record: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children = [Child(spec) for spec in specs]
        self.policy = policy or SupervisorSettings()
        self.record = record
        self.clock = clock
        self.tending = {child.spec.name: Tending() for child in self.children}

    def clean_leftovers(self) -> list[str]:
        """End the children a killed `radloop up` on this data dir left running; refuse when
        that `radloop up` is itself still running. Returns what was ended, in words."""
        if self.record is None:
            return []
        previous = runstate.read(self.record)
        if previous is None:
            return []
        if runstate.same_process(int(previous["pid"]), previous.get("pid_started")):
            raise SupervisorError(
                f"radloop up is already running on this data dir (pid {previous['pid']})"
            )
        ended = []
        for name, child in previous.get("children", {}).items():
            pid = child.get("pid")
            if pid and runstate.same_process(int(pid), child.get("pid_started")):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(int(pid), signal.SIGKILL)
                ended.append(f"{name} (pid {pid})")
        for name, child in previous.get("children", {}).items():
            pid = child.get("pid")
            if pid:
                wait_until(partial(_group_ended, int(pid)), 10, what=f"{name} ended")
        self.record.unlink(missing_ok=True)
        return ended

    def start(self) -> None:
        """Start every child as soon as the parts it names in `after` are healthy, several at
        once: on 2 cores `radloop up` is ready in about half the time of one after another."""
        self._save()
        names = {child.spec.name for child in self.children}
        waiting = list(self.children)
        starting: list[Child] = []
        healthy: set[str] = set()
        while waiting or starting:
            for child in [c for c in waiting if set(c.spec.after) & names <= healthy]:
                waiting.remove(child)
                self._launch(child)
                starting.append(child)
            if not starting:
                raise SupervisorError(
                    "these parts wait for each other: " + ", ".join(c.spec.name for c in waiting)
                )
            for child in [c for c in starting if c.is_healthy()]:
                starting.remove(child)
                self._started(child)
                healthy.add(child.spec.name)
            time.sleep(0.25)

    def _start(self, child: Child) -> None:
        self._launch(child)
        child.wait_healthy()
        self._started(child)

    def _launch(self, child: Child) -> None:
        tending = self.tending[child.spec.name]
        self._set(tending, ChildState.STARTING)
        tending.starts.append(self.clock())
        child.start()
        self._save()

    def _started(self, child: Child) -> None:
        if child.spec.after_start is not None:
            child.spec.after_start()
        self._set(self.tending[child.spec.name], ChildState.RUNNING)

    def watch(self, stop: threading.Event, interval: float = 0.5) -> None:
        """Tend the children until `stop` is set. Runs in the thread that started them (the
        children's parent-death signal is tied to that thread)."""
        while not stop.wait(interval):
            for child in self.children:
                self.tend(child)

    def tend(self, child: Child) -> None:
        tending = self.tending[child.spec.name]
        now = self.clock()
        if tending.state is ChildState.RUNNING:
            if child.alive():
                if tending.exits_in_a_row and now - tending.since >= self.policy.stable_seconds:
                    tending.exits_in_a_row = 0
                return
            self._exited(child, tending, child.returncode())
        elif tending.state is ChildState.BACKOFF and now >= tending.restart_at:
            tending.restarts += 1
            try:
                self._start(child)
            except Exception as error:
                log.error("%s did not come back: %s", child.spec.name, error)
                child.stop()
                self._exited(child, tending, child.returncode())

    def _exited(self, child: Child, tending: Tending, code: int | None) -> None:
        tending.exits_in_a_row += 1
        tending.last_exit = code
        name = child.spec.name
        if tending.exits_in_a_row > self.policy.restart_limit:
            log.error(
                "%s exited with %s, %d times in a row: not restarting it; see %s",
                name,
                code,
                tending.exits_in_a_row,
                child.spec.log_file,
            )
            self._set(tending, ChildState.FAILED)
            return
        delay = min(
            self.policy.restart_backoff_seconds * 2 ** (tending.exits_in_a_row - 1),
            self.policy.max_backoff_seconds,
        )
        log.error("%s exited with %s; restarting in %.1f s", name, code, delay)
        tending.restart_at = self.clock() + delay
        self._set(tending, ChildState.BACKOFF)

    def _set(self, tending: Tending, state: ChildState) -> None:
        tending.state = state
        tending.since = self.clock()
        self._save()

    def _save(self) -> None:
        if self.record is None:
            return
        me = os.getpid()
        children: dict[str, Any] = {}
        for child in self.children:
            tending = self.tending[child.spec.name]
            pid = child.pid if child.alive() else None
            children[child.spec.name] = {
                "pid": pid,
                "pid_started": runstate.process_started(pid) if pid else None,
                "state": tending.state.value,
                "restarts": tending.restarts,
                "exits_in_a_row": tending.exits_in_a_row,
                "last_exit": tending.last_exit,
                "log": str(child.spec.log_file),
                "url": child.spec.url,
            }
        record = {"pid": me, "pid_started": runstate.process_started(me), "children": children}
        runstate.write(self.record, record)

    def stop(self) -> None:
        for child in reversed(self.children):
            with contextlib.suppress(ProcessLookupError):
                child.stop()
            self.tending[child.spec.name].state = ChildState.STOPPED
        if self.record is not None:
            mine = runstate.read(self.record)
            if mine is not None and mine.get("pid") == os.getpid():
                self.record.unlink(missing_ok=True)


def _tail(log_file: Path, lines: int = 5) -> str:
    """The last lines of a child's log, to say why it failed without opening the file."""
    try:
        last = log_file.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"\n  {line}" for line in last if line.strip())


def _group_ended(pgid: int) -> bool:
    return not _group_alive(pgid)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies (exited, not yet reaped by their new parent) still count for killpg.
    return any(
        p.info["status"] != psutil.STATUS_ZOMBIE
        for p in psutil.process_iter(["status"])
        if _pgid(p.pid) == pgid
    )


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
