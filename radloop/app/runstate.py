"""The record `radloop up` keeps of itself and its children in `<data_dir>/run/up.json`:
written at every change of a child's state, read by `radloop status` (a child that crash-looped
shows as failed) and by the next `radloop up`, which ends what a killed one left behind."""

from __future__ import annotations

import contextlib
import json
from enum import StrEnum
from pathlib import Path
from typing import Any

import psutil

from radloop.durable import write_bytes_durably
from radloop.settings import Settings


class ChildState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"  # exited; restarts after a delay
    FAILED = "failed"  # exited too often in a row; left stopped
    STOPPED = "stopped"


def state_file(settings: Settings) -> Path:
    return settings.data_dir / "run" / "up.json"


def process_started(pid: int) -> float | None:
    """When process `pid` started (to tell it from a later process given the same id)."""
    with contextlib.suppress(psutil.Error):
        return float(psutil.Process(pid).create_time())
    return None


def same_process(pid: int, started: float | None) -> bool:
    return started is not None and process_started(pid) == started


def write(path: Path, record: dict[str, Any]) -> None:
    """Replace the record atomically: a reader never sees half of it."""
    write_bytes_durably(path, json.dumps(record, indent=2).encode())


def read(path: Path) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record


def live_record(settings: Settings) -> dict[str, Any] | None:
    """The record of the `radloop up` running on this data dir, None when none is."""
    record = read(state_file(settings))
    if record is None or not same_process(int(record["pid"]), record.get("pid_started")):
        return None
    return record
