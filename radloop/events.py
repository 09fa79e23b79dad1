"""The closed event vocabulary: `radloop.<noun>.<past-verb>`, typed payloads, UID resources.

Events are written to the outbox in the same transaction as the state change they report and
delivered to Prefect at least once (see `agents.outbox`). Payloads carry internal ids and UIDs
only — never a patient-identifying value.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel
from sqlalchemy.orm import Session

from radloop.db.models import OutboxEvent


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
    label_id: int
    annotation_id: int
    study_uid: str
    series_uid: str
    model: str
    split: str
    validated_by: str

    @property
    def resource_id(self) -> str:
        return f"radloop.label.{self.label_id}"

    @property
    def idempotency_key(self) -> str:
        return f"label:{self.label_id}"


class ModelEvent(BaseModel):
    """radloop.training.requested / model.registered / promoted / deployed / rolled_back."""

    kind: str
    model: str
    training_run_id: int | None = None
    mlflow_version: str | None = None
    triton_version: int | None = None
    previous_triton_version: int | None = None
    holdout_dice: float | None = None

    @property
    def resource_id(self) -> str:
        return f"radloop.model.{self.model}"

    @property
    def idempotency_key(self) -> str:
        return (
            f"model:{self.model}:{self.kind}:run:{self.training_run_id}"
            f":mlflow:{self.mlflow_version}:triton:{self.triton_version}"
        )


Payload = StudyCompleted | AnnotationDrafted | AnnotationCorrected | LabelValidated | ModelEvent

EVENT_PAYLOADS: dict[EventType, type[BaseModel]] = {
    EventType.STUDY_COMPLETED: StudyCompleted,
    EventType.ANNOTATION_DRAFTED: AnnotationDrafted,
    EventType.ANNOTATION_CORRECTED: AnnotationCorrected,
    EventType.LABEL_VALIDATED: LabelValidated,
    EventType.TRAINING_REQUESTED: ModelEvent,
    EventType.MODEL_REGISTERED: ModelEvent,
    EventType.MODEL_PROMOTED: ModelEvent,
    EventType.MODEL_DEPLOYED: ModelEvent,
    EventType.MODEL_ROLLED_BACK: ModelEvent,
}


def record_event(session: Session, event: EventType, payload: Payload) -> OutboxEvent:
    """Add an outbox row in the caller's transaction; it is delivered only if that commits."""
    row = OutboxEvent(
        event_id=str(uuid.uuid4()),
        event=event.value,
        resource_id=payload.resource_id,
        idempotency_key=payload.idempotency_key,
        payload=payload.model_dump(mode="json"),
        created_at=datetime.now(UTC),
        next_attempt_at=datetime.now(UTC),
    )
    session.add(row)
    return row
