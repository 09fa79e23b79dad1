"""A watch folder: files written or moved into it enter the ingest path once complete.

A file is taken when its size and modification time have not changed for `settle_seconds`
(a slow writer is waited for) and it parses as DICOM. What is not DICOM, or is not acceptable,
moves to the rejected folder beside a `<name>.reason` file; nothing else is held up by it.
Files already present at start-up are picked up too.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy.exc import SQLAlchemyError
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from dicom_listener.ingest import Ingestor
from dicom_listener.instance import InstanceHeader, InvalidInstance
from radloop.domain import IngestSource

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")


def _ignored(path: Path) -> bool:
    return path.name.startswith(".") or path.name.endswith(_IGNORED_SUFFIXES)


class _Changes(FileSystemEventHandler):
    def __init__(self, pending: dict[Path, float], lock: threading.Lock) -> None:
        self.pending = pending
        self.lock = lock

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        target = getattr(event, "dest_path", "") or event.src_path
        path = Path(os.fsdecode(target))
        if event.event_type != "deleted" and not _ignored(path):
            with self.lock:
                self.pending[path] = time.monotonic()


class WatchFolder:
    def __init__(
        self,
        folder: Path,
        rejected: Path,
        ingestor: Ingestor,
        settle_seconds: float = 2.0,
    ) -> None:
        self.folder = folder
        self.rejected = rejected
        self.ingestor = ingestor
        self.settle = settle_seconds
        self._pending: dict[Path, float] = {}
        self._sizes: dict[Path, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def scan(self) -> None:
        """Queue every file already in the folder (those written while radloop was down)."""
        now = time.monotonic()
        with self._lock:
            for path in self.folder.rglob("*"):
                if path.is_file() and not _ignored(path):
                    self._pending.setdefault(path, now)

    def process_settled(self) -> int:
        """Ingest or reject each pending file whose size and mtime held still long enough."""
        now = time.monotonic()
        with self._lock:
            candidates = [p for p, seen in self._pending.items() if now - seen >= self.settle]
        handled = 0
        for path in candidates:
            try:
                stat = path.stat()
            except FileNotFoundError:
                self._forget(path)
                continue
            signature = (stat.st_size, stat.st_mtime_ns)
            if self._sizes.get(path) != signature:
                # Still changing (or first look): wait another settle period.
                self._sizes[path] = signature
                with self._lock:
                    self._pending[path] = now
                continue
            self._forget(path)
            try:
                self._take(path)
            except (OSError, SQLAlchemyError) as error:
                # The store is unavailable, not the file bad: keep it and try again later.
                # File names from a PACS export may carry patient names: never log them.
                log.error("could not ingest a watch-folder file yet: %s", error)
                with self._lock:
                    self._pending[path] = now
                continue
            handled += 1
        return handled

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._pending.pop(path, None)
        self._sizes.pop(path, None)

    def _take(self, path: Path) -> None:
        data = path.read_bytes()
        try:
            dataset = dcmread(BytesIO(data))
            transfer_syntax = str(dataset.file_meta.TransferSyntaxUID)
            header = InstanceHeader.from_dataset(dataset, transfer_syntax)
        except InvalidDicomError:
            self._reject(path, "not a DICOM file (no DICM preamble/meta header)")
            return
        except InvalidInstance as error:
            self._reject(path, str(error))
            return
        except Exception as error:
            self._reject(path, f"cannot decode: {type(error).__name__}", detail=str(error))
            return
        self.ingestor.ingest(header, data, IngestSource.WATCH)
        path.unlink(missing_ok=True)

    def _reject(self, path: Path, reason: str, detail: str = "") -> None:
        """Move `path` to the rejected folder beside `<name>.reason`. `detail` (free text that
        may quote the file's content) goes into the .reason file only, never the log."""
        relative = path.relative_to(self.folder)
        target = self.rejected / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target = target.with_name(f"{target.name}.{time.time_ns()}")
        shutil.move(path, target)
        text = reason + (f"\n{detail}" if detail else "") + "\n"
        target.with_name(target.name + ".reason").write_text(text)
        log.warning(
            "rejected a watch-folder file (%s); it and its .reason are in %s",
            reason,
            self.rejected,
        )

    def run(self, stop: threading.Event) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rejected.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        observer.schedule(_Changes(self._pending, self._lock), str(self.folder), recursive=True)
        observer.start()
        try:
            self.scan()
            while not stop.is_set():
                try:
                    self.process_settled()
                except Exception:
                    log.exception("watch folder pass failed; retrying")
                stop.wait(min(0.5, self.settle / 2))
        finally:
            observer.stop()
            observer.join()
