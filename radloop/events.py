"""The closed event vocabulary: `radloop.<noun>.<past-verb>`, typed payloads, UID resources.

Events are written to the outbox in the same transaction as the state change they report and
delivered to Prefect at least once (see `agents.outbox`). Payloads carry internal ids and UIDs
only — never a patient-identifying value.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import ClassVar

from pydantic import BaseModel, field_validator
from sqlalchemy.orm import Session

from radloop.db.models import OutboxEvent
from radloop.domain import LabelSplit


class EventType(StrEnum):
    STUDY_COMPLETED = "radloop.study.completed"
    ANNOTATION_DRAFTED = "radloop.annotation.drafted"
    ANNOTATION_CORRECTED = "radloop.annotation.corrected"
    LABEL_VALIDATED = "radloop.label.validated"
    TRAINING_REQUESTED = "radloop.training.requested"
    MODEL_REGISTERED = "radloop.model.registered"
    MODEL_PROMOTED = "radloop.model.promoted"
    MODEL_DEPLOYED = "radloop.model.deployed"
    MODEL_ROLLED_BACK = "radloop.model.rolled_back"


class StudyCompleted(BaseModel):
    EVENT: ClassVar[EventType] = EventType.STUDY_COMPLETED

    study_id: int
    study_uid: str
    revision: int
    instances: int
    series_uids: list[str]

    @property
    def resource_id(self) -> str:
        return f"radloop.study.{self.study_uid}"

    @property
    def idempotency_key(self) -> str:
        return f"study:{self.study_uid}:rev:{self.revision}"


class AnnotationDrafted(BaseModel):
    EVENT: ClassVar[EventType] = EventType.ANNOTATION_DRAFTED

    annotation_id: int
    study_uid: str
    revision: int
    series_uid: str
    model: str
    model_version: str
    seg_sop_instance_uid: str
    uncertainty: float

    @property
    def resource_id(self) -> str:
        return f"radloop.annotation.{self.annotation_id}"

    @property
    def idempotency_key(self) -> str:
        return f"study:{self.study_uid}:rev:{self.revision}:model:{self.model}:{self.model_version}"


class AnnotationCorrected(BaseModel):
    EVENT: ClassVar[EventType] = EventType.ANNOTATION_CORRECTED

    annotation_id: int
    study_uid: str
    model: str
    model_version: str | None
    correction_sop_instance_uid: str
    # Dice(draft, correction): 1.0 means the reader changed nothing.
    dice: float
    reader: str

    @property
    def resource_id(self) -> str:
        return f"radloop.annotation.{self.annotation_id}"

    @property
    def idempotency_key(self) -> str:
        return f"annotation:{self.annotation_id}:correction:{self.correction_sop_instance_uid}"


class LabelValidated(BaseModel):
    EVENT: ClassVar[EventType] = EventType.LABEL_VALIDATED

    label_id: int
    annotation_id: int
    study_uid: str
    series_uid: str
    model: str
    split: LabelSplit
    validated_by: str

    @property
    def resource_id(self) -> str:
        return f"radloop.label.{self.label_id}"

    @property
    def idempotency_key(self) -> str:
        return f"label:{self.label_id}"


MODEL_EVENTS = frozenset(
    {
        EventType.TRAINING_REQUESTED,
        EventType.MODEL_REGISTERED,
        EventType.MODEL_PROMOTED,
        EventType.MODEL_DEPLOYED,
        EventType.MODEL_ROLLED_BACK,
    }
)


class ModelEvent(BaseModel):
    """radloop.training.requested / model.registered / promoted / deployed / rolled_back: the
    same payload, `kind` says which."""

    kind: EventType
    model: str
    training_run_id: int | None = None
    mlflow_version: str | None = None
    triton_version: int | None = None
    previous_triton_version: int | None = None
    holdout_dice: float | None = None

    @field_validator("kind")
    @classmethod
    def _a_model_event(cls, kind: EventType) -> EventType:
        if kind not in MODEL_EVENTS:
            raise ValueError(f"{kind} is not a model event")
        return kind

    @property
    def EVENT(self) -> EventType:
        return self.kind

    @property
    def resource_id(self) -> str:
        return f"radloop.model.{self.model}"

    @property
    def idempotency_key(self) -> str:
        kind = self.kind.value.removeprefix("radloop.")  # the keys' form before kind was typed
        return (
            f"model:{self.model}:{kind}:run:{self.training_run_id}"
            f":mlflow:{self.mlflow_version}:triton:{self.triton_version}"
        )


Payload = StudyCompleted | AnnotationDrafted | AnnotationCorrected | LabelValidated | ModelEvent


def record_event(session: Session, payload: Payload) -> OutboxEvent:
    """Add an outbox row for the event `payload` reports, in the caller's transaction; it is
    delivered only if that commits."""
    row = OutboxEvent(
        event_id=str(uuid.uuid4()),
        event=payload.EVENT.value,
        resource_id=payload.resource_id,
        idempotency_key=payload.idempotency_key,
        payload=payload.model_dump(mode="json"),
        created_at=datetime.now(UTC),
        next_attempt_at=datetime.now(UTC),
    )
    session.add(row)
    return row
