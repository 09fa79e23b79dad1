"""The review service killed (kill -9) while it saves a reader's correction, then started
again: the reader's client, which got no answer, sends the save again. Whether the kill landed
before or after the save's commit, the case ends corrected once, with the uploaded label and
one `radloop.annotation.corrected` event, and a second person can validate it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from agents.nifti import read_label_map
from radloop.app.supervisor import Child
from radloop.app.supervisor.specs import review_spec
from radloop.db import Annotation, OutboxEvent
from radloop.events import EventType
from tests.conftest_marks import STACK
from tests.review_cases import Review

# After the upload went out: early in the save (reading the series), in the middle (writing the
# SEG), and late (perhaps past the commit, the answer not yet sent).
KILL_AFTER_SECONDS = (0.05, 0.4, 1.2)
Answer = httpx.Response | Exception

# The review service as its own process; on both databases (a transaction cut by the kill).
pytestmark = [pytest.mark.slow, STACK]


def put_label(url: str, upload: bytes, headers: dict[str, str]) -> httpx.Response:
    """A reader's client saving a label file."""
    return httpx.put(url, content=upload, headers=headers, timeout=60)


def answer_into(answers: list[Answer], call: Callable[[], httpx.Response]) -> None:
    """`call`'s answer, or the error that came instead of one, into `answers`."""
    try:
        answers.append(call())
    except httpx.HTTPError as error:
        answers.append(error)


def test_a_save_cut_by_kill_9_is_kept_once_or_taken_when_sent_again(review: Review) -> None:
    service = Child(review_spec(review.settings))
    service.start()
    url = review.settings.review.local_url
    as_ann = {"authorization": f"Bearer {review.tokens['ann']}"}
    as_rita = {"authorization": f"Bearer {review.tokens['rita']}"}
    cut = 0
    try:
        service.wait_healthy()
        for seed, delay in enumerate(KILL_AFTER_SECONDS, start=81):
            case, study = review.drafted(seed)
            claim = httpx.post(f"{url}/api/annotations/{case}/claim", headers=as_ann, timeout=60)
            assert claim.status_code == 200, claim.text
            upload = study.truth.read_bytes()
            answers: list[Answer] = []
            save = partial(put_label, f"{url}/api/annotations/{case}/label", upload, as_ann)
            sender = threading.Thread(target=answer_into, args=(answers, save))
            sender.start()
            time.sleep(delay)
            service.kill()
            sender.join(60)
            service.start()
            service.wait_healthy()

            (answer,) = answers
            if isinstance(answer, Exception):  # no answer: the client sends it again
                cut += 1
                again = save()
                # Taken now, or already taken before the kill: then the case is no longer
                # ann's to change, and the service says it is corrected.
                assert again.status_code == 200 or (
                    again.status_code == 409 and "corrected" in again.text
                ), again.text
            else:
                assert answer.status_code == 200, answer.text

            with review.store.read() as session:
                annotation = session.get_one(Annotation, case)
                events = session.scalars(
                    select(OutboxEvent).where(
                        OutboxEvent.event == EventType.ANNOTATION_CORRECTED.value,
                        OutboxEvent.resource_id == f"radloop.annotation.{case}",
                    )
                ).all()
                state, path = annotation.state, annotation.correction_path
            assert state == "corrected" and len(events) == 1, (delay, state, len(events))
            assert path is not None
            saved = read_label_map(Path(path))
            assert np.array_equal(saved, read_label_map(study.truth)), delay
            validated = httpx.post(
                f"{url}/api/annotations/{case}/validate", headers=as_rita, timeout=60
            )
            assert validated.status_code == 200 and validated.json()["state"] == "validated"
    finally:
        service.stop()
    assert cut >= 1  # at least one kill landed while the save was under way
