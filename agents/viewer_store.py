"""Put what a reader opens into the Orthanc the viewer reads: the study's images and the draft.

OHIF reads through the review service's DICOMweb proxy, which forwards to radloop's Orthanc.
Studies that arrive over C-STORE or through the watch folder exist only in radloop's spool, so
before a case is offered to readers its study's instances (every revision up to the case's)
and its draft SEG are uploaded there. Each upload first asks Orthanc which SOP Instance UIDs it
holds and sends only the missing ones, so a retry, a second model's case of the same study or a
late instance's revision stores nothing twice. Instances radloop took from the Orthanc it
follows are never sent back: if Orthanc no longer holds them, someone removed them there.

A case becomes viewable (`annotations.viewable_at`) only when everything is in; until then the
worklist does not offer it and `viewer_error` says why. The annotator publishes right after
drafting (the flow retries it); `ViewerStore.run` re-publishes whatever is still unviewable,
so a case outlives an Orthanc outage longer than the flow's retries.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from pathlib import Path

import httpx
from pyorthanc import Orthanc
from sqlalchemy import select

from radloop.db import Annotation, Instance, Store, Study, utcnow
from radloop.domain import AnnotationState, IngestSource

log = logging.getLogger(__name__)

# Cases a reader may still open; closed ones (corrected, validated) were viewable already.
_PUBLISHED_STATES = (
    AnnotationState.QUEUED.value,
    AnnotationState.DRAFTED.value,
    AnnotationState.CLAIMED.value,
)


class ViewerStoreUnavailable(RuntimeError):
    """The images could not be put into the viewer's Orthanc; retrying later may work."""


class ViewerStore:
    def __init__(self, store: Store, spool_dir: Path, orthanc: Orthanc | None) -> None:
        """With `orthanc` None there is no viewer store to fill: cases are viewable at once."""
        self.store = store
        self.spool_dir = spool_dir
        self.orthanc = orthanc

    def publish(self, annotation_id: int) -> int:
        """Make the case readable through DICOMweb and mark it viewable; return how many
        instances were uploaded. Raise `ViewerStoreUnavailable` (after recording the reason on
        the case) when Orthanc cannot be reached or refuses an instance."""
        with self.store.read() as session:
            annotation = session.get_one(Annotation, annotation_id)
            if annotation.viewable_at is not None:
                return 0
            study_uid = session.scalars(
                select(Study.study_uid).where(Study.id == annotation.study_id)
            ).one()
            instances = [
                (str(sop_uid), str(path), str(source))
                for sop_uid, path, source in session.execute(
                    select(Instance.sop_instance_uid, Instance.path, Instance.source).where(
                        Instance.study_id == annotation.study_id,
                        Instance.revision <= annotation.study_revision,
                    )
                )
            ]
            seg = (annotation.seg_sop_instance_uid, annotation.seg_path)
        uploaded = 0
        if self.orthanc is not None:
            try:
                uploaded = self._upload(self.orthanc, study_uid, instances, seg)
            except (httpx.HTTPError, OSError) as error:
                reason = (
                    f"images not yet in the viewer's store (Orthanc at {self.orthanc.url}): "
                    f"{type(error).__name__}: {str(error)[:200]}"
                )
                self._mark(annotation_id, error=reason)
                raise ViewerStoreUnavailable(reason) from error
        self._mark(annotation_id, error=None)
        if uploaded:
            log.info("study %s: %d instances stored in Orthanc for the viewer", study_uid, uploaded)
        return uploaded

    def prefetch(self, study_uid: str, revision: int) -> int:
        """Store the study's images (revisions up to `revision`) while its draft is being
        made, so that offering the case later adds only the SEG. Best effort: `publish`
        checks and uploads again whatever is missing. Returns how many were uploaded."""
        if self.orthanc is None:
            return 0
        with self.store.read() as session:
            instances = [
                (str(sop_uid), str(path), str(source))
                for sop_uid, path, source in session.execute(
                    select(Instance.sop_instance_uid, Instance.path, Instance.source)
                    .join(Study, Study.id == Instance.study_id)
                    .where(Study.study_uid == study_uid, Instance.revision <= revision)
                )
            ]
        try:
            uploaded = self._upload(self.orthanc, study_uid, instances, (None, None))
        except (httpx.HTTPError, OSError) as error:
            log.info("study %s: images not stored ahead of the draft (%r)", study_uid, error)
            return 0
        if uploaded:
            log.info(
                "study %s: %d instances stored in Orthanc for the viewer, ahead of the draft",
                study_uid,
                uploaded,
            )
        return uploaded

    def _upload(
        self,
        orthanc: Orthanc,
        study_uid: str,
        instances: list[tuple[str, str, str]],
        seg: tuple[str | None, str | None],
    ) -> int:
        held = _held(orthanc, study_uid)
        uploaded = 0
        gone_from_source = 0
        for sop_uid, path, source in instances:
            if sop_uid in held:
                continue
            if source == IngestSource.ORTHANC.value:
                gone_from_source += 1
                continue
            orthanc.post_instances((self.spool_dir / path).read_bytes())
            uploaded += 1
        seg_uid, seg_path = seg
        if seg_uid and seg_path and seg_uid not in held:
            orthanc.post_instances(Path(seg_path).read_bytes())
        if gone_from_source:
            log.warning(
                "study %s: %d instances taken from Orthanc are no longer there; not sent back",
                study_uid,
                gone_from_source,
            )
        return uploaded

    def _mark(self, annotation_id: int, error: str | None) -> None:
        with self.store.transaction() as session:
            annotation = session.get_one(Annotation, annotation_id)
            if error is None:
                annotation.viewable_at = utcnow()
            annotation.viewer_error = error
            annotation.updated_at = utcnow()

    # -- reconciler ------------------------------------------------------------------------

    def pending(self, older_than: timedelta) -> list[int]:
        """Open cases not yet viewable whose last attempt is at least `older_than` old."""
        cutoff = utcnow() - older_than
        with self.store.read() as session:
            return list(
                session.scalars(
                    select(Annotation.id)
                    .where(
                        Annotation.viewable_at.is_(None),
                        Annotation.state.in_(_PUBLISHED_STATES),
                        Annotation.series_uid.is_not(None),
                        Annotation.updated_at <= cutoff,
                    )
                    .order_by(Annotation.id)
                ).all()
            )

    def publish_pending(self, older_than: timedelta) -> int:
        """Publish every pending case; stop at the first outage. Return how many became
        viewable."""
        done = 0
        for annotation_id in self.pending(older_than):
            try:
                self.publish(annotation_id)
            except ViewerStoreUnavailable as error:
                log.warning("annotation %d: %s", annotation_id, error)
                break
            done += 1
        return done

    def run(self, stop: threading.Event, interval: float = 15.0) -> None:
        """Re-publish unviewable cases every `interval` seconds until `stop` is set. A case is
        left alone for `interval` after its last attempt, so this loop and the annotation
        flow's own retries seldom upload the same study at once (harmless if they do)."""
        while not stop.wait(interval):
            try:
                self.publish_pending(timedelta(seconds=interval))
            except Exception:
                log.exception("viewer store reconciliation failed; trying again")


def _held(orthanc: Orthanc, study_uid: str) -> set[str]:
    """SOP Instance UIDs of the study that Orthanc holds."""
    found = orthanc.post_tools_find(
        json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
    )
    if not isinstance(found, list):
        raise httpx.HTTPError(f"Orthanc answered /tools/find with {type(found).__name__}")
    return {str(item["MainDicomTags"].get("SOPInstanceUID")) for item in found}
