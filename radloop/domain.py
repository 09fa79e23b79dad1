"""Closed sets of the domain: states a reader can see, where an instance came from, who may
do what, and what a retraining is doing."""

from __future__ import annotations

import re
from enum import StrEnum

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(value: object) -> bool:
    """A DICOM UID that is safe to use as a path component: digits and dots, at most 64."""
    return isinstance(value, str) and len(value) <= 64 and bool(UID_PATTERN.match(value))


def draft_key(study_uid: str, revision: int, model: str, version: str | None) -> str:
    """What is unique per draft: a study revision × model version (None: no draft yet)."""
    return f"study:{study_uid}:rev:{revision}:model:{model}:{version or 'none'}"


class StudyState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    ANNOTATING = "annotating"
    DRAFTED = "drafted"
    IN_REVIEW = "in_review"
    VALIDATED = "validated"
    REJECTED = "rejected"
    FAILED = "failed"


class AnnotationState(StrEnum):
    """One study revision × model version. QUEUED: in the review queue without a draft (no
    model version yet); NOT_APPLICABLE: no series fits the model, `reason` says why."""

    QUEUED = "queued"
    DRAFTED = "drafted"
    CLAIMED = "claimed"
    CORRECTED = "corrected"
    VALIDATED = "validated"
    NOT_APPLICABLE = "not_applicable"


class IngestSource(StrEnum):
    DIMSE = "dimse"
    ORTHANC = "orthanc"
    WATCH = "watch"


class LabelSplit(StrEnum):
    """Where a validated label goes; a holdout label is never trained on."""

    TRAIN = "train"
    HOLDOUT = "holdout"


class Role(StrEnum):
    """Who may do what in the review service (see agents.review.auth.PERMISSIONS)."""

    READER = "reader"
    REVIEWER = "reviewer"
    ML_ENGINEER = "ml-engineer"
    ADMIN = "admin"


# The retrain flow and its deployment in Prefect: what `radloop train`, the review service's
# `/monailabel/train/` and the ghost sweep name (here, so the CLI imports no training code).
RETRAIN_FLOW = "retrain-model"
RETRAIN_DEPLOYMENT = f"{RETRAIN_FLOW}/retrain"


class TrainingTrigger(StrEnum):
    """What started a retraining: enough new train labels, the cron schedule, a person."""

    THRESHOLD = "threshold"
    SCHEDULE = "schedule"
    MANUAL = "manual"


class TrainingState(StrEnum):
    """A retraining (`training_runs.state`). RUNNING until decided; PROMOTED or REJECTED by
    the holdout gate; FAILED on an error; CANCELLED when cancelled or terminated (Prefect's
    cancellation, SIGTERM). SKIPPED is only reported, never stored: nothing new to learn, or
    the model is already training."""

    RUNNING = "running"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


class JobState(StrEnum):
    """An annotation job (`annotation_jobs.state`): one study revision × model × the version
    serving when it completed. SUBMITTED to Prefect as a background task (again, when its lease
    ran out); RUNNING on a worker that renews the lease; DONE once the annotator recorded an
    outcome (a draft, a case without a draft, or not applicable)."""

    SUBMITTED = "submitted"
    RUNNING = "running"
    DONE = "done"


class WorkerQueue(StrEnum):
    """What a `radloop worker` runs: annotation background tasks, or training flow runs."""

    ANNOTATE = "annotate"
    TRAIN = "train"
