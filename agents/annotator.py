"""Annotate one completed study revision with one model: pick the series the model's spec
accepts, infer, write the draft (SEG + NIfTI), record it, put the study's images and the SEG
in the Orthanc the viewer reads (`agents.viewer_store`).

Every step is idempotent, keyed on study revision and model: a second call for a revision
that already has a case only makes sure it is in the viewer's store. Errors propagate, each
noted with the step it came from, so the caller — the flow — retries outages with backoff and,
when drafting cannot succeed, calls `queue_failed`: no completed study vanishes from the
worklist because its draft could not be made.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pyorthanc import Orthanc
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from agents.drafts import remove_cut_attempts, write_draft
from agents.selection import embedding_bytes
from agents.viewer_store import ViewerStore, ViewerStoreUnavailable
from agents.volume import LoadedSeries, SeriesRejected, load_series, series_files
from model_registry.inference import InferenceBackend
from model_registry.repository import TritonRepository
from radloop.db import Annotation, Series, Store, Study, utcnow
from radloop.domain import AnnotationState, StudyState, draft_key
from radloop.events import AnnotationDrafted, record_event
from radloop.modelspec import ModelSpec, Orientation

log = logging.getLogger(__name__)

_STEP_NOTE = "radloop step: "


@dataclass(frozen=True)
class Outcome:
    annotation_id: int
    state: AnnotationState
    reason: str | None = None


@contextmanager
def _step(name: str) -> Iterator[None]:
    """Note on any exception which step of drafting raised it (read by `failure_reason`)."""
    try:
        yield
    except Exception as error:
        if not any(note.startswith(_STEP_NOTE) for note in getattr(error, "__notes__", [])):
            error.add_note(_STEP_NOTE + name)
        raise


def failure_reason(error: BaseException) -> str:
    """What a reader and an operator see for a draft that could not be made: the step, the
    exception's type and the start of its message (UIDs and server answers, no header values:
    radloop's own errors never quote patient attributes)."""
    steps = [
        n.removeprefix(_STEP_NOTE)
        for n in getattr(error, "__notes__", [])
        if n.startswith(_STEP_NOTE)
    ]
    step = f" ({steps[0]})" if steps else ""
    return f"draft failed{step}: {type(error).__name__}: {str(error)[:300]}"


def _is_axial(series: LoadedSeries) -> bool:
    normal = series.affine[:3, 0] / np.linalg.norm(series.affine[:3, 0])
    return abs(float(normal[2])) > 0.95


class Annotator:
    def __init__(
        self,
        store: Store,
        spool_dir: Path,
        drafts_dir: Path,
        repository: TritonRepository,
        backend: InferenceBackend,
        orthanc: Orthanc | None,
    ) -> None:
        self.store = store
        self.spool_dir = spool_dir
        self.drafts_dir = drafts_dir
        self.repository = repository
        self.backend = backend
        self.viewer = ViewerStore(store, spool_dir, orthanc)

    def annotate(self, study_uid: str, revision: int, spec: ModelSpec) -> Outcome:
        """Draft (or queue, or refuse with a reason) study revision `revision` for `spec`."""
        done = self._existing(study_uid, revision, spec.name)
        if done is not None:
            if done.state != AnnotationState.NOT_APPLICABLE and done.viewable_at is None:
                with _step("store"):
                    self.viewer.publish(done.id)
            return Outcome(done.id, AnnotationState(done.state), done.reason)
        started = time.perf_counter()
        with _step("load"):
            series, reasons = self._pick_series(study_uid, spec)
        timings = {"load_s": time.perf_counter() - started}
        versions = self.repository.versions(spec.name)
        if series is None:
            reason = "; ".join(reasons) or "the study has no series"
            return self._record_without_draft(
                study_uid, revision, spec, None, AnnotationState.NOT_APPLICABLE, reason
            )
        if not versions:
            # Cold start: readers label from scratch; drafts come once a model exists.
            return self._record_without_draft(
                study_uid, revision, spec, series.series_uid, AnnotationState.QUEUED, None
            )
        # The study's images go to the viewer's Orthanc while Triton works on the draft.
        images = threading.Thread(
            target=self.viewer.prefetch, args=(study_uid, revision), daemon=True
        )
        images.start()
        started = time.perf_counter()
        champion = self.repository.champion(spec.name)
        with _step("infer"):
            result = self.backend.infer(spec.name, series.array, series.spacing, champion)
        timings["infer_s"] = time.perf_counter() - started
        started = time.perf_counter()
        # One folder per draft key: attempts at the same draft write side by side there.
        folder = self.drafts_dir / study_uid / f"rev{revision}-{spec.name}-v{result.model_version}"
        with _step("write"):
            files = write_draft(series, result.labels, spec, result.model_version, folder)
        timings["write_s"] = time.perf_counter() - started
        key = draft_key(study_uid, revision, spec.name, result.model_version)
        try:
            with self.store.transaction() as session:
                study = session.execute(
                    select(Study).where(Study.study_uid == study_uid)
                ).scalar_one()
                now = utcnow()
                annotation = Annotation(
                    draft_key=key,
                    study_id=study.id,
                    study_revision=revision,
                    series_uid=series.series_uid,
                    model_name=spec.name,
                    model_version=result.model_version,
                    state=AnnotationState.DRAFTED.value,
                    uncertainty=result.uncertainty,
                    scores=dict(result.scores)
                    or {spec.uncertainty.method.value: result.uncertainty},
                    embedding=embedding_bytes(result.embedding),
                    seg_sop_instance_uid=files.seg_sop_instance_uid,
                    seg_series_uid=files.seg_series_uid,
                    seg_path=str(files.seg_path),
                    nifti_path=str(files.nifti_path),
                    timings=timings,
                    created_at=now,
                    updated_at=now,
                )
                session.add(annotation)
                session.flush()
                if study.revision == revision:
                    study.state = StudyState.DRAFTED.value
                record_event(
                    session,
                    AnnotationDrafted(
                        annotation_id=annotation.id,
                        study_uid=study_uid,
                        revision=revision,
                        series_uid=series.series_uid,
                        model=spec.name,
                        model_version=result.model_version,
                        seg_sop_instance_uid=files.seg_sop_instance_uid,
                        uncertainty=result.uncertainty,
                    ),
                )
                annotation_id = annotation.id
        except IntegrityError:
            # A concurrent run drafted this revision first (same draft key): keep its draft.
            files.seg_path.unlink(missing_ok=True)
            files.nifti_path.unlink(missing_ok=True)
            winner = self._existing(study_uid, revision, spec.name)
            if winner is None:
                raise  # not a race on the draft key: another constraint failed
            return Outcome(winner.id, AnnotationState(winner.state), winner.reason)
        remove_cut_attempts(folder, keep={files.seg_path, files.nifti_path})
        # Recorded first, so the Orthanc follower recognises the SEG as radloop's own draft.
        started = time.perf_counter()
        with _step("store"):
            images.join()
            self.viewer.publish(annotation_id)
        timings["store_s"] = time.perf_counter() - started
        with self.store.transaction() as session:
            stored = session.get(Annotation, annotation_id)
            if stored is not None:
                stored.timings = dict(timings)
        log.info(
            "drafted study %s rev %d with %s v%s (uncertainty %.3f)",
            study_uid,
            revision,
            spec.name,
            result.model_version,
            result.uncertainty,
        )
        return Outcome(annotation_id, AnnotationState.DRAFTED)

    def _existing(
        self, study_uid: str, revision: int, model: str, *, queued: bool = False
    ) -> Annotation | None:
        """The revision's newest case for `model`; draftless queued ones only with `queued`."""
        query = (
            select(Annotation)
            .join(Study, Study.id == Annotation.study_id)
            .where(
                Study.study_uid == study_uid,
                Annotation.study_revision == revision,
                Annotation.model_name == model,
            )
            .order_by(Annotation.id.desc())
        )
        if not queued:
            query = query.where(Annotation.state != AnnotationState.QUEUED)
        with self.store.read() as session:
            return session.scalars(query).first()

    def _pick_series(
        self, study_uid: str, spec: ModelSpec
    ) -> tuple[LoadedSeries | None, list[str]]:
        """The first series that meets the spec's input rules, or the reason each failed."""
        candidates, reasons = self._candidates(study_uid, spec)
        for series_uid in candidates:
            try:
                files = series_files(self.store, self.spool_dir, series_uid)
                series = load_series(files, min_slices=spec.input.min_slices)
            except SeriesRejected as rejected:
                reasons.append(f"series {series_uid}: {rejected}")
                continue
            if spec.input.orientation == Orientation.AXIAL and not _is_axial(series):
                reasons.append(f"series {series_uid}: not axial")
                continue
            return series, reasons
        return None, reasons

    def _candidates(self, study_uid: str, spec: ModelSpec) -> tuple[list[str], list[str]]:
        """Series of the study whose index entry (modality, description) meets the spec's
        rules, in arrival order, and the reason each other one does not."""
        with self.store.read() as session:
            rows = session.execute(
                select(Series.series_uid, Series.modality, Series.description)
                .join(Study, Study.id == Series.study_id)
                .where(Study.study_uid == study_uid)
                .order_by(Series.id)
            ).all()
        accepted, reasons = [], []
        rules = spec.input
        for series_uid, modality, description in rows:
            if modality != rules.modality:
                reasons.append(f"series {series_uid}: modality {modality}, needs {rules.modality}")
            elif not rules.matches_description(description):
                reasons.append(f"series {series_uid}: description does not match the spec")
            else:
                accepted.append(str(series_uid))
        return accepted, reasons

    def _record_without_draft(
        self,
        study_uid: str,
        revision: int,
        spec: ModelSpec,
        series_uid: str | None,
        state: AnnotationState,
        reason: str | None,
    ) -> Outcome:
        key = draft_key(study_uid, revision, spec.name, None)
        with self.store.transaction() as session:
            found = session.scalars(select(Annotation).where(Annotation.draft_key == key)).first()
            if found is None:
                study = session.execute(
                    select(Study).where(Study.study_uid == study_uid)
                ).scalar_one()
                now = utcnow()
                found = Annotation(
                    draft_key=key,
                    study_id=study.id,
                    study_revision=revision,
                    series_uid=series_uid,
                    model_name=spec.name,
                    state=state.value,
                    reason=reason,
                    created_at=now,
                    updated_at=now,
                )
                session.add(found)
                session.flush()
                if reason:
                    log.info(
                        "study %s rev %d: no draft from %s: %s",
                        study_uid,
                        revision,
                        spec.name,
                        reason,
                    )
            outcome = Outcome(found.id, AnnotationState(found.state), found.reason)
            unviewable = found.viewable_at is None and found.series_uid is not None
        if outcome.state == AnnotationState.QUEUED and unviewable:
            with _step("store"):
                self.viewer.publish(outcome.annotation_id)
        return outcome

    def queue_failed(self, study_uid: str, revision: int, spec: ModelSpec, reason: str) -> Outcome:
        """After drafting failed for good: queue the study for readers without a draft, with
        `reason`, unless the revision already has a case (a draft whose images are not yet in
        the viewer's store keeps its own reason; the viewer-store reconciler finishes it)."""
        found = self._existing(study_uid, revision, spec.name, queued=True)
        if found is not None:
            return Outcome(found.id, AnnotationState(found.state), found.reason)
        # The step and the exception type only: a message could quote a header value.
        summary = ": ".join(reason.split(": ")[:2])
        log.warning("study %s rev %d: %s; queued without a draft", study_uid, revision, summary)
        try:
            return self._record_without_draft(
                study_uid,
                revision,
                spec,
                next(iter(self._candidates(study_uid, spec)[0]), None),
                AnnotationState.QUEUED,
                reason,
            )
        except ViewerStoreUnavailable as error:
            # Queued and recorded; the reconciler stores its images once Orthanc answers.
            log.warning("study %s rev %d: %s", study_uid, revision, error)
            key = draft_key(study_uid, revision, spec.name, None)
            with self.store.read() as session:
                queued = session.scalars(select(Annotation).where(Annotation.draft_key == key))
                row = queued.one()
                return Outcome(row.id, AnnotationState(row.state), row.reason)
