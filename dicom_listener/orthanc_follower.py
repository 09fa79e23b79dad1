"""Follow an Orthanc's change log and pull each stable study into the ingest path.

The resume point (Orthanc's change sequence number) lives in the database, saved after each
change is fully handled, so a restart of radloop or Orthanc resumes where it stopped; a change
handled twice finds its instances known and its revision already complete, and does nothing.
A change that fails while Orthanc and the database answer (its study was deleted meanwhile, an
instance Orthanc cannot return) is tried `MAX_ATTEMPTS` times, then skipped with its reason in
`<rejected>/orthanc-change-<seq>.reason`, so one bad change never stalls the follower.
"""

from __future__ import annotations

import logging
import threading
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pyorthanc import Orthanc
from sqlalchemy import or_, select
from sqlalchemy.exc import SQLAlchemyError

from dicom_listener.assembly import StudyAssembler
from dicom_listener.ingest import Ingestor
from dicom_listener.instance import InstanceHeader, InvalidInstance
from radloop.db import Annotation, Cursor, Store, utcnow
from radloop.domain import IngestSource

log = logging.getLogger(__name__)

CURSOR_NAME = "orthanc.changes"
PAGE = 100
MAX_ATTEMPTS = 3
# Outages: the change is tried again later, however often, and never skipped for them.
_OUTAGES = (httpx.TransportError, OSError, SQLAlchemyError)


class OrthancFollower:
    def __init__(
        self,
        store: Store,
        ingestor: Ingestor,
        assembler: StudyAssembler,
        client: Orthanc,
        poll_seconds: float = 1.0,
        rejected_folder: Path | None = None,
    ) -> None:
        self.store = store
        self.ingestor = ingestor
        self.assembler = assembler
        self.client = client
        self.poll_seconds = poll_seconds
        self.rejected_folder = rejected_folder
        # Failed attempts per change sequence number; a restart grants a change new attempts.
        self._attempts: dict[int, int] = {}

    def cursor(self) -> int:
        with self.store.read() as session:
            row = session.get(Cursor, CURSOR_NAME)
            return int(row.value) if row else 0

    def _save_cursor(self, seq: int) -> None:
        with self.store.transaction() as session:
            row = session.get(Cursor, CURSOR_NAME)
            if row is None:
                session.add(Cursor(name=CURSOR_NAME, value=str(seq), updated_at=utcnow()))
            else:
                row.value, row.updated_at = str(seq), utcnow()

    def poll_once(self) -> int:
        """Handle the next page of changes; return how many were read."""
        since = self.cursor()
        page: dict[str, Any] = self.client.get_changes(params={"since": since, "limit": PAGE})
        changes = page.get("Changes", [])
        if not changes and int(page.get("Last", since)) < since:
            # Orthanc's database was replaced: its sequence restarted below our cursor.
            log.warning(
                "Orthanc change log restarted (last %s < %s); following from 0",
                page.get("Last"),
                since,
            )
            self._save_cursor(0)
            return 0
        for change in changes:
            seq = int(change["Seq"])
            if change.get("ChangeType") == "StableStudy":
                try:
                    self.import_study(str(change["ID"]))
                except _OUTAGES:
                    raise
                except Exception as error:
                    self._attempts[seq] = self._attempts.get(seq, 0) + 1
                    if self._attempts[seq] < MAX_ATTEMPTS:
                        raise
                    self._skip(seq, str(change["ID"]), error)
            self._attempts.pop(seq, None)
            self._save_cursor(seq)
        return len(changes)

    def _skip(self, seq: int, orthanc_id: str, error: Exception) -> None:
        reason = (
            f"Orthanc change {seq} (StableStudy, Orthanc study {orthanc_id}) skipped after "
            f"{MAX_ATTEMPTS} attempts: {type(error).__name__}: {str(error)[:300]}\n"
        )
        log.warning(
            "Orthanc change %d skipped after %d attempts (%s)",
            seq,
            MAX_ATTEMPTS,
            type(error).__name__,
        )
        if self.rejected_folder is not None:
            self.rejected_folder.mkdir(parents=True, exist_ok=True)
            (self.rejected_folder / f"orthanc-change-{seq}.reason").write_text(reason)

    def import_study(self, orthanc_id: str) -> None:
        """Copy the study's new instances into the spool, then complete its revision.

        A study whose instances radloop knows already is left alone: either this change was
        handled before (its revision completed then, or the quiet period completes it), or
        radloop stored them in Orthanc itself for the viewer — a study it received over
        C-STORE, which may still be receiving and must complete on its own quiet period."""
        instances: list[dict[str, Any]] = self.client.get_studies_id_instances(orthanc_id)
        study_uid = None
        for instance in instances:
            sop_uid = instance.get("MainDicomTags", {}).get("SOPInstanceUID", "")
            if sop_uid and self._is_own_draft(sop_uid):
                # radloop put its draft SEG there: not a new instance of the study.
                continue
            if sop_uid and self.ingestor.is_known(sop_uid):
                continue
            data: bytes = self.client.get_instances_id_file(instance["ID"])
            try:
                dataset = dcmread(BytesIO(data))
                header = InstanceHeader.from_dataset(
                    dataset, str(dataset.file_meta.TransferSyntaxUID)
                )
            except InvalidInstance as error:
                log.warning("skipped Orthanc instance %s: %s", instance["ID"], error)
                continue
            except Exception as error:
                log.warning(
                    "skipped Orthanc instance %s: cannot decode (%s)",
                    instance["ID"],
                    type(error).__name__,
                )
                continue
            self.ingestor.ingest(header, data, IngestSource.ORTHANC)
            study_uid = header.study_uid
        if study_uid is not None:
            self.assembler.complete(study_uid)

    def _is_own_draft(self, sop_uid: str) -> bool:
        with self.store.read() as session:
            found = session.scalar(
                select(Annotation.id).where(
                    or_(
                        Annotation.seg_sop_instance_uid == sop_uid,
                        Annotation.correction_sop_instance_uid == sop_uid,
                    )
                )
            )
        return found is not None

    def run(self, stop: threading.Event) -> None:
        """Follow until `stop` is set; while Orthanc is unreachable, back off and retry."""
        delay = self.poll_seconds
        failures = 0
        while not stop.is_set():
            try:
                read = self.poll_once()
                delay, failures = self.poll_seconds, 0
                if read == PAGE:
                    continue
            except (httpx.HTTPError, OSError) as error:
                failures += 1
                if failures == 1:
                    # Often a kept-alive connection the server has just closed: retry at once.
                    log.debug("Orthanc request failed (%s); retrying", type(error).__name__)
                    continue
                log.warning(
                    "Orthanc at %s unreachable (%s); retrying in %.0f s",
                    self.client.url,
                    type(error).__name__,
                    delay,
                )
                delay = min(delay * 2, 30.0)
            except Exception:
                log.exception("following Orthanc failed; retrying")
                delay = min(delay * 2, 30.0)
            stop.wait(delay)
