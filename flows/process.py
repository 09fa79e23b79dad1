"""Which process runs a flow run: the mark each radloop flow writes on its Prefect flow run as
it starts, and whether that process still lives.

Prefect's runner (3.8) records no process on the runs it serves, so after a stop or a crash
nothing tells a run whose process is gone from one still working. Each flow therefore marks
its run first thing: `infrastructure_pid` "host:pid" (the format of Prefect's process worker)
and the label `radloop.process-start`, the process's boot id and start time, which tells the
process apart from a later one that got the same pid (pids wrap at 32768 here).
`flows.ghosts` reads the marks.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from uuid import UUID

log = logging.getLogger(__name__)

START_LABEL = "radloop.process-start"
_PROC = Path("/proc")


def this_host() -> str:
    return socket.gethostname()


def process_start(pid: int) -> str | None:
    """'<boot id>:<start time in clock ticks since boot>' of process `pid`, or None when it
    does not exist (or is a zombie) or this system has no /proc."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
        boot = (_PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces and parentheses): state is the
    # first, start time the twentieth (field 22 of proc(5)).
    fields = stat.rpartition(")")[2].split()
    if fields[0] in ("Z", "X"):
        return None
    return f"{boot}:{fields[19]}"


def process_alive(pid: int, start: str | None) -> bool:
    """Whether process `pid` of this host runs now and, when `start` is known, is the process
    that started then (not a later one with the same pid)."""
    if not (_PROC / "self" / "stat").exists():  # no /proc: the pid alone must do
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    now = process_start(pid)
    return now is not None and (start is None or now == start)


def mark_this_run() -> None:
    """Record on the current Prefect flow run which process runs it. Called first in every
    flow of radloop's deployments; does nothing outside a flow run. A failure to write the mark
    fails the run: an unmarked run counts as a ghost once its grace period is over."""
    from prefect.client.orchestration import get_client
    from prefect.runtime.flow_run import get_id

    run_id = get_id()
    if run_id is None:
        return
    pid = os.getpid()
    with get_client(sync_client=True) as client:
        # The label first: a sweep that sees the pid then always sees its start too.
        client.update_flow_run_labels(UUID(run_id), {START_LABEL: process_start(pid) or ""})
        client.update_flow_run(UUID(run_id), infrastructure_pid=f"{this_host()}:{pid}")
    log.debug("flow run %s runs in %s:%d", run_id, this_host(), pid)
