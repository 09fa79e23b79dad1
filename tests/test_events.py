"""The event vocabulary is typed end to end: each payload knows the event it reports."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from radloop.db import Store
from radloop.domain import LabelSplit
from radloop.events import EventType, LabelValidated, ModelEvent, record_event


def test_a_payload_is_recorded_as_the_event_it_reports(store: Store) -> None:
    label = LabelValidated(
        label_id=1,
        annotation_id=2,
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        model="m",
        split="holdout",  # as read back from JSON
        validated_by="rita",
    )
    assert label.split is LabelSplit.HOLDOUT
    promoted = ModelEvent(kind=EventType.MODEL_PROMOTED, model="m", training_run_id=3)
    with store.transaction() as session:
        rows = [record_event(session, label), record_event(session, promoted)]
        assert [row.event for row in rows] == [
            "radloop.label.validated",
            "radloop.model.promoted",
        ]
        assert rows[1].idempotency_key.startswith("model:m:model.promoted:run:3")


def test_a_model_event_of_another_family_or_a_split_outside_the_set_is_refused() -> None:
    with pytest.raises(ValidationError, match="is not a model event"):
        ModelEvent(kind=EventType.STUDY_COMPLETED, model="m")
    with pytest.raises(ValidationError):
        LabelValidated(
            label_id=1,
            annotation_id=2,
            study_uid="1",
            series_uid="2",
            model="m",
            split="test",
            validated_by="r",
        )
