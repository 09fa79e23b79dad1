"""Runs one child command so that it cannot outlive whoever started it.

Started by `ChildProcess` as `python guard.py PARENT_PID COMMAND...` in a session of its own,
the guard asks Linux to send it SIGTERM when its parent dies (PR_SET_PDEATHSIG) — whether the
parent stopped cleanly, was killed with SIGKILL, lost its terminal or its output pipe — and
then ends the whole process group: the command and anything the command started (MLflow's
gunicorn workers, the Prefect server's uvicorn, Triton's python-backend stubs, flow runs).

Signals sent to the guard (SIGTERM, SIGINT, SIGHUP) go to every process in its group; the
guard exits with the command's exit status once the command has ended, after SIGKILLing any
straggler of the group. It is a file run by path, importing only the standard library, so it
starts in milliseconds and never imports radloop.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
# After the parent's death: how long the command may take to stop before the group is killed.
PARENT_GONE_GRACE_SECONDS = 20.0


def _others_in_group() -> list[int]:
    me, group = os.getpid(), os.getpgid(0)
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            try:
                if os.getpgid(int(entry)) == group:
                    found.append(int(entry))
            except ProcessLookupError:
                pass
    return found


def _kill_stragglers() -> None:
    for pid in _others_in_group():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    parent, command = int(argv[0]), argv[1:]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        return 1
    deadline: list[float] = []

    def forward(signum: int, _frame: object) -> None:
        if os.getppid() != parent and not deadline:
            deadline.append(time.monotonic() + PARENT_GONE_GRACE_SECONDS)
        # Everyone in the group gets the signal; the guard's own copy is discarded.
        signal.signal(signum, signal.SIG_IGN)
        os.killpg(0, signum)
        signal.signal(signum, forward)

    child = subprocess.Popen(command)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    while True:
        try:
            code = child.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if os.getppid() != parent and not deadline:  # a missed PDEATHSIG
                forward(signal.SIGTERM, None)
            if deadline and time.monotonic() > deadline[0]:
                child.kill()
    _kill_stragglers()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
