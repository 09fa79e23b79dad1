"""One child process that dies with its parent: the class `radloop up` supervises its parts
with and the tests start their servers with."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

GUARD = Path(__file__).with_name("guard.py")


class ChildProcess:
    """`argv` run under the guard (see guard.py): in a process group of its own, its output
    appended to `log_file` (discarded when None), ended with the group when this process dies.

    `pid` is the guard's, which is also the group's id; `command_pid` the command's own.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        log_file: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(os.environ if env is None else env)
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        """Start the command. Call from a thread that lives as long as the child should: Linux
        signals the parent's death when the *thread* that started the child ends."""
        argv = [sys.executable, "-I", str(GUARD), str(os.getpid()), *self.argv]
        if self.log_file is None:
            self.process = subprocess.Popen(
                argv,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,  # Ctrl-C reaches radloop, which stops children in order
            )
        else:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_file, "ab") as out:
                self.process = subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=self.env,
                    start_new_session=True,
                )
        log.info("started %s (pid %d)", self.name, self.process.pid)

    @property
    def command_pid(self) -> int | None:
        """The command's own process id (the guard's child), None before it has one."""
        if not self.alive() or self.pid is None:
            return None
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(self.pid).children()
            if children:
                return int(children[0].pid)
        return None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Send `sig` to the whole group; SIGKILL the group if it has not ended in `timeout`
        seconds. Returns the command's exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, sig)  # the guard passes it to the group
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
                self.kill()
            log.info("stopped %s", self.name)
        return self.process.returncode

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the group, no goodbye: what a crash does. Returns once no process of the
        group is left (up to `timeout` seconds), so the ports it held are free again."""
        if self.process is not None and self.process.poll() is None:
            group = self.process.pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            self.process.wait()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)
