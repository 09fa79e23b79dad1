"""The one path every instance takes, whatever brought it: spool file first, then the index.

An instance counts as received only when both are done; callers acknowledge after `ingest`
returns. Study revisions: an instance that arrives after its study completed reopens the study
under the next revision, which completes on its own.

Group commit: one thread per `Ingestor` (the indexer) runs the index statements of every
instance waiting, from however many associations, in one transaction — while their files are
still being written and synced by the threads that received them — and commits once every one
of those files is in place: one commit, one WAL or PostgreSQL log flush, for the group. A row
is never committed before its file is durable; an instance whose file could not be written is
left out of the group, which is indexed again without it. A known instance is found by the
same statements (its row exists), and its receiving thread drops the file it wrote.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Row, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from dicom_listener.instance import InstanceHeader
from dicom_listener.spool import SPOOL_FILE_MODE, instance_path
from radloop.db import Instance, Series, Store, Study, utcnow
from radloop.domain import IngestSource, StudyState
from radloop.durable import replace_durably, stage_bytes

log = logging.getLogger(__name__)


class IngestOutcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"


class _WriteFailed(Exception):
    """A file of the group could not be written: its transaction must not commit."""


@dataclass(eq=False)
class _Pending:
    """One instance between its receiving thread and the indexer."""

    header: InstanceHeader
    relative: Path
    size: int
    source: IngestSource
    checked: threading.Event = field(default_factory=threading.Event)
    written: threading.Event = field(default_factory=threading.Event)
    write_failed: bool = False
    indexed: threading.Event = field(default_factory=threading.Event)
    added: bool = False
    error: BaseException | None = None


class Ingestor:
    # The indexer thread ends when nothing arrived for this long; the next instance starts it.
    IDLE_SECONDS = 5.0
    MAX_GROUP = 64

    def __init__(self, store: Store, spool_dir: Path) -> None:
        self.store = store
        self.spool_dir = spool_dir
        self._waiting: list[_Pending] = []
        self._arrived = threading.Condition()
        self._indexer_running = False

    def is_known(self, sop_instance_uid: str) -> bool:
        with self.store.read() as session:
            found = session.scalar(
                select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
            )
        return found is not None

    def ingest(
        self,
        header: InstanceHeader,
        data: bytes | Sequence[bytes | memoryview],
        source: IngestSource,
    ) -> IngestOutcome:
        """Store `data` (a DICOM file: preamble, meta, dataset — whole or in chunks) and
        index it. Idempotent: a known SOP Instance UID is neither written nor indexed again.
        Raises OSError when the file cannot be written, SQLAlchemyError when the index
        cannot be; nothing is committed for the instance then."""
        relative = instance_path(header.study_uid, header.series_uid, header.sop_instance_uid)
        target = self.spool_dir / relative
        size = len(data) if isinstance(data, bytes) else sum(len(chunk) for chunk in data)
        pending = _Pending(header, relative, size, source)
        self._submit(pending)  # the indexer checks and indexes while the file is written
        try:
            temp = stage_bytes(target, data, mode=SPOOL_FILE_MODE)
            try:
                pending.checked.wait()
                if pending.added and pending.error is None:
                    replace_durably(temp, target)
                else:
                    temp.unlink()  # known already (its file stays as it was), or no index
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
        except BaseException:
            pending.write_failed = True
            raise
        finally:
            pending.written.set()
        pending.indexed.wait()
        if pending.error is not None:
            raise pending.error
        if pending.added:
            log.debug("stored instance %s of study %s", header.sop_instance_uid, header.study_uid)
            return IngestOutcome.STORED
        return IngestOutcome.DUPLICATE

    def _submit(self, pending: _Pending) -> None:
        with self._arrived:
            self._waiting.append(pending)
            self._arrived.notify()
            if not self._indexer_running:
                self._indexer_running = True
                threading.Thread(target=self._run_indexer, name="indexer", daemon=True).start()

    def _run_indexer(self) -> None:
        while True:
            with self._arrived:
                if not self._waiting:
                    self._arrived.wait(self.IDLE_SECONDS)
                if not self._waiting:
                    self._indexer_running = False
                    return
                group = self._waiting[: self.MAX_GROUP]
                del self._waiting[: self.MAX_GROUP]
            self._index_group(group)

    def _index_group(self, group: list[_Pending]) -> None:
        """Index `group` in one transaction that commits once all its files are in place.

        The statements run first and tell each receiving thread whether its instance is new
        (`checked`; then it moves its synced file into place) or known (it drops the file).
        Every member ends with `indexed` set, and `added` or `error` telling how."""
        try:
            while group:
                try:
                    with self.store.connection() as conn:
                        try:
                            for pending in group:
                                pending.added = self._index(
                                    conn,
                                    pending.header,
                                    pending.relative,
                                    pending.size,
                                    pending.source,
                                )
                        except Exception as error:
                            for pending in group:
                                pending.error = error
                            raise
                        finally:
                            for pending in group:
                                pending.checked.set()
                        for pending in group:
                            pending.written.wait()
                        if any(pending.write_failed for pending in group):
                            raise _WriteFailed  # roll back, and index the rest again
                    return
                except _WriteFailed:
                    # Their own threads raise the write's error.
                    group = [pending for pending in group if not pending.write_failed]
        except Exception as error:
            for pending in group:
                pending.error = error
        finally:
            for pending in group:
                pending.checked.set()  # not set yet if the database was out of reach
                pending.indexed.set()

    def _index(
        self,
        conn: Connection,
        header: InstanceHeader,
        relative: Path,
        size: int,
        source: IngestSource,
    ) -> bool:
        """Index one written instance; False if another writer indexed it first.

        Core statements on a connection rather than ORM objects or a session's `execute`:
        this runs once per received instance, and the ORM's unit of work, then its statement
        execution, were most of its cost.
        """
        now = utcnow()
        study = self._lock_study(conn, header, now)
        series_id = conn.scalar(_SERIES, {"uid": header.series_uid})
        if series_id is None:
            series = {
                "study_id": study.id,
                "series_uid": header.series_uid,
                "modality": header.modality,
                "series_number": header.series_number,
                "description": header.series_description,
                "frame_of_reference_uid": header.frame_of_reference_uid,
            }
            conn.execute(_insert_new(conn, Series), series).close()
            series_id = conn.scalar(_SERIES, {"uid": header.series_uid})
        reopening = study.state != StudyState.RECEIVING
        revision = study.revision + 1 if reopening else study.revision
        instance = {
            "study_id": study.id,
            "series_id": series_id,
            "sop_instance_uid": header.sop_instance_uid,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "path": relative.as_posix(),
            "size_bytes": size,
            "revision": revision,
            "source": source.value,
            "received_at": now,
        }
        if conn.execute(_insert_new(conn, Instance), instance).first() is None:
            return False  # the row was there: ON CONFLICT DO NOTHING returned no id
        changes: dict[str, Any] = {"last_received_at": now}
        if reopening:
            log.info("study %s reopened as revision %d", header.study_uid, revision)
            changes.update(
                state=StudyState.RECEIVING.value, revision=revision, completed_at=None, reason=None
            )
        modalities = set(filter(None, (study.modalities or "").split("\\")))
        if header.modality and header.modality not in modalities:
            changes["modalities"] = "\\".join(sorted(modalities | {header.modality}))
        conn.execute(_UPDATE_STUDY, {"study_row": study.id, **changes})
        return True

    def _lock_study(
        self, conn: Connection, header: InstanceHeader, now: datetime
    ) -> Row[int, str, int, str | None]:
        """The study's row (created if new), locked for this transaction."""
        row = conn.execute(_STUDY, {"uid": header.study_uid}).one_or_none()
        if row is not None:
            return row
        study = {
            "study_uid": header.study_uid,
            "state": StudyState.RECEIVING.value,
            "revision": 1,
            "study_date": header.study_date,
            "modalities": header.modality,
            "first_received_at": now,
            "last_received_at": now,
        }
        conn.execute(_insert_new(conn, Study), study).close()
        return conn.execute(_STUDY, {"uid": header.study_uid}).one()


# The index statements, built once: building them per instance (`.values(...)` and all) was
# most of the indexer's time. Parameters are given at execution.
_STUDY = (
    select(Study.id, Study.state, Study.revision, Study.modalities)
    .where(Study.study_uid == bindparam("uid"))
    .with_for_update()
)
_SERIES = select(Series.id).where(Series.series_uid == bindparam("uid"))
# No `.values()`: the SET clause is the columns named in the parameters.
_UPDATE_STUDY = update(Study).where(Study.id == bindparam("study_row"))
# RETURNING the id tells whether a row was added: with parameters given at execution,
# psycopg's rowcount is -1 whether or not the row conflicted.
_INSERTS = {
    (dialect, table): insert(table).on_conflict_do_nothing().returning(table.id)
    for dialect, insert in (("sqlite", sqlite.insert), ("postgresql", postgresql.insert))
    for table in (Study, Series, Instance)
}


def _insert_new(conn: Connection, table: Any) -> Any:
    """INSERT … ON CONFLICT DO NOTHING into `table`, in the connection's dialect."""
    return _INSERTS[conn.dialect.name, table]
