"""Tables of the state store. States are the enums of `radloop.domain`, stored as text."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC on every backend, returned timezone-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: dict[Any, Any] = {datetime: UTCDateTime}


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    # Bumped when an instance arrives after completion: each revision completes once.
    revision: Mapped[int] = mapped_column(Integer, default=1)
    study_date: Mapped[str | None] = mapped_column(String(8))
    modalities: Mapped[str | None] = mapped_column(String(64))
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime] = mapped_column(index=True)
    completed_at: Mapped[datetime | None]
    reason: Mapped[str | None] = mapped_column(Text)

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    description: Mapped[str | None] = mapped_column(String(64))
    frame_of_reference_uid: Mapped[str | None] = mapped_column(UID)

    study: Mapped[Study] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (Index("ix_instances_study_revision", "study_id", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    # Relative to the spool directory; built only from validated UIDs.
    path: Mapped[str] = mapped_column(String(256))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    revision: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime]


class Annotation(Base):
    """A draft (or its absence) for one study revision and model version."""

    __tablename__ = "annotations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # study:<uid>:rev:<n>:model:<name>:<version|none> — at most one per key.
    draft_key: Mapped[str] = mapped_column(String(200), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    study_revision: Mapped[int] = mapped_column(Integer)
    series_uid: Mapped[str | None] = mapped_column(UID)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)
    # The spec's uncertainty method's score; `scores` has every method the draft computed
    # (entropy always) and `embedding` the study's float32 embedding: what the model's
    # active-learning strategy ranks the open cases on (`agents.selection`).
    uncertainty: Mapped[float | None] = mapped_column(Float)
    scores: Mapped[dict[str, float] | None] = mapped_column(JSON)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
    seg_sop_instance_uid: Mapped[str | None] = mapped_column(UID, unique=True)
    seg_series_uid: Mapped[str | None] = mapped_column(UID)
    seg_path: Mapped[str | None] = mapped_column(String(256))
    nifti_path: Mapped[str | None] = mapped_column(String(256))
    reason: Mapped[str | None] = mapped_column(Text)
    # Seconds per step of drafting (load, infer, write, store): for operators and benchmarks.
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON)
    # When the study's images and the draft SEG were all in the Orthanc the viewer reads;
    # until then readers are not offered the case. `viewer_error` says why it is not yet.
    viewable_at: Mapped[datetime | None] = mapped_column(index=True)
    viewer_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    # Review. A reviewer's "urgent" puts the case ahead of the learning order.
    urgent: Mapped[bool] = mapped_column(Boolean, default=False)
    # The last claim: who and until when (kept after it lapses, to say so on a late save).
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    corrected_by: Mapped[str | None] = mapped_column(String(64))
    corrected_at: Mapped[datetime | None]
    correction_sop_instance_uid: Mapped[str | None] = mapped_column(UID, unique=True)
    # The correction as a label NIfTI on the series grid (its SEG lies beside it).
    correction_path: Mapped[str | None] = mapped_column(String(256))
    # Correction effort: Dice(draft, correction), mean over the labels either one holds.
    correction_dice: Mapped[float | None] = mapped_column(Float)
    correction_dice_per_label: Mapped[dict[str, float] | None] = mapped_column(JSON)
    validated_by: Mapped[str | None] = mapped_column(String(64))
    validated_at: Mapped[datetime | None] = mapped_column(index=True)


class Label(Base):
    """A validated annotation, written to the training set; its split never changes."""

    __tablename__ = "labels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    annotation_id: Mapped[int] = mapped_column(ForeignKey("annotations.id"), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    split: Mapped[str] = mapped_column(String(16))
    series_uid: Mapped[str] = mapped_column(UID)
    # SOP Instance UID of the SEG the label came from (correction, or accepted draft).
    seg_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    image_path: Mapped[str] = mapped_column(String(256))
    label_path: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime]


class HoldoutScore(Base):
    """Dice per label name of one served model version on one holdout label: the gate takes
    the champion's from here instead of evaluating it again (`agents.retrain.scores`)."""

    __tablename__ = "holdout_scores"

    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    triton_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id"), primary_key=True)
    dice: Mapped[dict[str, float]] = mapped_column(JSON)
    created_at: Mapped[datetime]


class Interaction(Base):
    """One click-guided refinement a reader asked for (`agents.review.assist`)."""

    __tablename__ = "interactions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    annotation_id: Mapped[int] = mapped_column(ForeignKey("annotations.id"), index=True)
    user_name: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    # Every click of the request: [channel, slice, row, column], channel 0 background.
    clicks: Mapped[list[list[int]]] = mapped_column(JSON)
    click_count: Mapped[int] = mapped_column(Integer)
    # The refined label map (NIfTI on the series grid), kept for "Accept refined label".
    label_path: Mapped[str] = mapped_column(String(256))
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime]


class TrainingRun(Base):
    """One retraining of one model: what it trained on, what MLflow holds, what was decided."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    trigger: Mapped[str] = mapped_column(String(16))
    # radloop.domain.TrainingState: running, promoted, rejected (by the gate), failed, cancelled
    state: Mapped[str] = mapped_column(String(16), index=True)
    # Labels used (ids; their UIDs are in the MLflow manifest), and the holdout judged on.
    label_ids: Mapped[list[int] | None] = mapped_column(JSON)
    holdout_label_ids: Mapped[list[int] | None] = mapped_column(JSON)
    parent_version: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    epochs: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_version: Mapped[str | None] = mapped_column(String(16))
    triton_version: Mapped[int | None] = mapped_column(Integer)
    champion_dice: Mapped[dict[str, float] | None] = mapped_column(JSON)
    challenger_dice: Mapped[dict[str, float] | None] = mapped_column(JSON)
    decision: Mapped[str | None] = mapped_column(Text)
    # How the labels it trained on were selected: {strategy: count} ("urgent" included).
    strategies: Mapped[dict[str, int] | None] = mapped_column(JSON)
    # Seconds per phase (prepare, train, evaluate, register, deploy) for operators and bench.
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(index=True)
    # Bumped every epoch: a running row without a heartbeat for long was killed, not running.
    heartbeat_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]


class ModelSetting(Base):
    """A model's active-learning strategy and seed, as an admin last set them (the spec's
    `active_learning` section until then)."""

    __tablename__ = "model_settings"

    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    strategy: Mapped[str] = mapped_column(String(32))
    seed: Mapped[int] = mapped_column(Integer)
    changed_by: Mapped[str | None] = mapped_column(String(64))
    changed_at: Mapped[datetime]


class Selection(Base):
    """One case handed to a reader: by which strategy (or "urgent"), seed, the strategy's value
    and the draft's scores, its rank, and the batch it was chosen with (STYLE rule 11)."""

    __tablename__ = "selections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    annotation_id: Mapped[int] = mapped_column(ForeignKey("annotations.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(32))
    user_name: Mapped[str] = mapped_column(String(64))
    strategy: Mapped[str] = mapped_column(String(32))
    seed: Mapped[int] = mapped_column(Integer)
    value: Mapped[float | None] = mapped_column(Float)
    scores: Mapped[dict[str, float] | None] = mapped_column(JSON)
    rank: Mapped[int] = mapped_column(Integer)
    # Cases chosen together (one request for k readers, or k cases) share it.
    batch: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime]


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    # SHA-256 of the API token (random, 256 bits): the token itself is shown once.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # scrypt hash for the login page; unset: the token is the password.
    password_hash: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime]
    disabled_at: Mapped[datetime | None]


class WebSession(Base):
    """A browser login. Kept in the database so logins survive a restart and can be revoked."""

    __tablename__ = "web_sessions"

    # SHA-256 of the cookie value.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)


class LoginFailure(Base):
    """Failed logins in a row, per user name and per client address (keyed by their SHA-256):
    enough of them lock that name or address out for a while (OWASP ASVS 2.2.1)."""

    __tablename__ = "login_failures"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    last_failed_at: Mapped[datetime]
    locked_until: Mapped[datetime | None]


class AuditEvent(Base):
    """Who viewed, claimed, changed or validated which case: a user name, an action and
    internal ids, never a UID or patient data."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    user_name: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(32))
    study_id: Mapped[int | None] = mapped_column(Integer, index=True)
    annotation_id: Mapped[int | None] = mapped_column(Integer)


class OutboxEvent(Base):
    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Stable across retries: Prefect stores an event id once, so redelivery is harmless.
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    event: Mapped[str] = mapped_column(String(64), index=True)
    resource_id: Mapped[str] = mapped_column(String(128))
    idempotency_key: Mapped[str] = mapped_column(String(160))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime]
    next_attempt_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None] = mapped_column(index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)


class AnnotationJob(Base):
    """Work radloop wants done: draft one completed study revision with one model. The durable
    record behind Prefect's background tasks, which are at most once (`agents.jobs`)."""

    __tablename__ = "annotation_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # study:<uid>:rev:<n>:model:<name>:<version|none>
    job_key: Mapped[str] = mapped_column(String(200), unique=True)
    study_uid: Mapped[str] = mapped_column(UID)
    revision: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Submitted: when the reconciler submits it again; running: renewed by the worker.
    lease_until: Mapped[datetime] = mapped_column(index=True)
    task_run_id: Mapped[str | None] = mapped_column(String(36))
    worker: Mapped[str | None] = mapped_column(String(128))
    annotation_id: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str | None] = mapped_column(String(16))
    last_error: Mapped[str | None] = mapped_column(Text)
    # When the study revision completed (its study.completed event was written).
    completed_at: Mapped[datetime]
    submitted_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Worker(Base):
    """A `radloop worker` process, as it last reported itself (`agents.jobs.WorkerRegistry`)."""

    __tablename__ = "workers"

    # host:pid:<process start>: a later process with the same pid is another worker.
    id: Mapped[str] = mapped_column(String(160), primary_key=True)
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime]
    last_seen_at: Mapped[datetime] = mapped_column(index=True)


class Cursor(Base):
    """Named resume points of followers (e.g. Orthanc's /changes sequence)."""

    __tablename__ = "cursors"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))
    updated_at: Mapped[datetime]
