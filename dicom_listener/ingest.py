"""The one path every instance takes, whatever brought it: spool file first, then the index.

An instance counts as received only when both are done; callers acknowledge after `ingest`
returns. Study revisions: an instance that arrives after its study completed reopens the study
under the next revision, which completes on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Row, select, update
from sqlalchemy.orm import Session

from dicom_listener.instance import InstanceHeader
from dicom_listener.spool import SPOOL_FILE_MODE, instance_path
from radloop.db import Instance, Series, Store, Study, insert_ignoring_conflict, utcnow
from radloop.domain import IngestSource, StudyState
from radloop.durable import write_bytes_durably

log = logging.getLogger(__name__)


class IngestOutcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"


class Ingestor:
    def __init__(self, store: Store, spool_dir: Path) -> None:
        self.store = store
        self.spool_dir = spool_dir

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
        index it. Idempotent: a known SOP Instance UID is neither written nor indexed again."""
        if self.is_known(header.sop_instance_uid):
            return IngestOutcome.DUPLICATE
        relative = instance_path(header.study_uid, header.series_uid, header.sop_instance_uid)
        write_bytes_durably(self.spool_dir / relative, data, mode=SPOOL_FILE_MODE)
        size = len(data) if isinstance(data, bytes) else sum(len(chunk) for chunk in data)
        with self.store.transaction() as session:
            added = self._index(session, header, relative, size, source)
        if added:
            log.debug("stored instance %s of study %s", header.sop_instance_uid, header.study_uid)
            return IngestOutcome.STORED
        return IngestOutcome.DUPLICATE

    def _index(
        self,
        session: Session,
        header: InstanceHeader,
        relative: Path,
        size: int,
        source: IngestSource,
    ) -> bool:
        """Index one written instance; False if another writer indexed it first.

        Core statements rather than ORM objects: this runs once per received instance and
        the ORM's unit of work was most of its cost.
        """
        now = utcnow()
        study = self._lock_study(session, header, now)
        series_id = session.scalar(select(Series.id).where(Series.series_uid == header.series_uid))
        if series_id is None:
            insert_ignoring_conflict(
                session,
                Series,
                {
                    "study_id": study.id,
                    "series_uid": header.series_uid,
                    "modality": header.modality,
                    "series_number": header.series_number,
                    "description": header.series_description,
                    "frame_of_reference_uid": header.frame_of_reference_uid,
                },
            )
            series_id = session.scalar(
                select(Series.id).where(Series.series_uid == header.series_uid)
            )
        reopening = study.state != StudyState.RECEIVING
        revision = study.revision + 1 if reopening else study.revision
        added = insert_ignoring_conflict(
            session,
            Instance,
            {
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
            },
        )
        if not added:
            return False
        changes: dict[str, Any] = {"last_received_at": now}
        if reopening:
            log.info("study %s reopened as revision %d", header.study_uid, revision)
            changes.update(
                state=StudyState.RECEIVING.value, revision=revision, completed_at=None, reason=None
            )
        modalities = set(filter(None, (study.modalities or "").split("\\")))
        if header.modality and header.modality not in modalities:
            changes["modalities"] = "\\".join(sorted(modalities | {header.modality}))
        session.execute(update(Study).where(Study.id == study.id).values(**changes))
        return True

    def _lock_study(
        self, session: Session, header: InstanceHeader, now: datetime
    ) -> Row[int, str, int, str | None]:
        """The study's row (created if new), locked for this transaction."""
        query = (
            select(Study.id, Study.state, Study.revision, Study.modalities)
            .where(Study.study_uid == header.study_uid)
            .with_for_update()
        )
        row = session.execute(query).one_or_none()
        if row is not None:
            return row
        insert_ignoring_conflict(
            session,
            Study,
            {
                "study_uid": header.study_uid,
                "state": StudyState.RECEIVING.value,
                "revision": 1,
                "study_date": header.study_date,
                "modalities": header.modality,
                "first_received_at": now,
                "last_received_at": now,
            },
        )
        return session.execute(query).one()
