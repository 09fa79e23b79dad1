"""The worklist's active-learning order through the review API, on real drafts: each model's
strategy ranks its open cases, k readers asking at once get k distinct cases chosen together,
urgency is shown first but recorded as such, and every pick is recorded with its strategy,
seed, scores and model version."""

from __future__ import annotations

import subprocess
import threading
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from agents.review.auth import Users
from agents.selection import near_distance
from radloop.db import Annotation, Selection
from radloop.domain import Role
from tests.review_cases import Review
from tests.servers import RADLOOP, radloop_json

# Every case is drafted by in-process inference first.
pytestmark = pytest.mark.slow

MODEL = "phantom-abdomen"


def _admin(review: Review) -> str:
    review.tokens["ada"] = Users(review.store).add("ada", Role.ADMIN)
    return "ada"


def _next_at_once(review: Review, users: list[str]) -> dict[str, Any]:
    """Each of `users` asks for the next case at the same instant: user → answer (or status)."""
    clients = {user: review.client(user) for user in users}
    barrier = threading.Barrier(len(users))
    answers: dict[str, Any] = {}

    def ask(user: str) -> None:
        barrier.wait()
        response = clients[user].post("/api/worklist/next")
        answers[user] = response.json() if response.status_code == 200 else response.status_code

    threads = [threading.Thread(target=ask, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def _embeddings(review: Review, cases: list[int]) -> np.ndarray[Any, Any]:
    with review.store.read() as session:
        rows = [session.get_one(Annotation, case).embedding for case in cases]
    return np.stack([np.frombuffer(row or b"", dtype="<f4") for row in rows])


def test_readers_asking_at_once_get_distinct_cases_and_diversity_keeps_twins_apart(
    review: Review,
) -> None:
    twin_a, _ = review.drafted(51)
    twin_b, _ = review.drafted(51)  # the same images under new UIDs: a near-duplicate
    other, _ = review.drafted(52)
    vectors = _embeddings(review, [twin_a, twin_b, other])
    assert np.linalg.norm(vectors[0] - vectors[1]) < near_distance(vectors)
    admin = review.client(_admin(review))
    chosen = admin.put(f"/api/models/{MODEL}/strategy", json={"strategy": "diversity", "seed": 5})
    assert chosen.status_code == 200 and chosen.json()["strategy"] == "diversity"

    answers = _next_at_once(review, ["ann", "bob"])

    given = {user: answer["annotation_id"] for user, answer in answers.items()}
    assert len(set(given.values())) == 2, answers
    assert other in given.values(), "two readers were handed the twins"
    for user, answer in answers.items():
        assert answer["claimed_by"] == user and answer["state"] == "claimed"
    with review.store.read() as session:
        picks = session.scalars(select(Selection).order_by(Selection.id)).all()
        drafts = {case: session.get_one(Annotation, case) for case in given.values()}
    assert {(p.user_name, p.annotation_id) for p in picks} == set(given.items())
    for pick in picks:
        draft = drafts[pick.annotation_id]
        assert (pick.strategy, pick.seed, pick.model_name) == ("diversity", 5, MODEL)
        assert pick.model_version == draft.model_version == "1"
        assert pick.scores == draft.scores and pick.value is not None and pick.rank >= 1
    # The claimed cases are covered now: the twin left is ranked for whoever asks next.
    listed = review.client("rita").get("/api/worklist").json()
    waiting = [item for item in listed if item["state"] == "drafted"]
    assert [item["annotation_id"] for item in waiting] == list(
        {twin_a, twin_b} - set(given.values())
    )
    assert waiting[0]["selection"]["strategy"] == "diversity"


def test_a_reviewer_hands_a_batch_to_several_readers(review: Review) -> None:
    first, _ = review.drafted(53)
    second, _ = review.drafted(54)
    rita = review.client("rita")
    assert (
        review.client("ann").post("/api/worklist/batch", json={"readers": ["ann"]}).status_code
        == 403
    )
    refused = rita.post("/api/worklist/batch", json={"readers": ["ann", "mo"]})
    assert refused.status_code == 422 and "'mo'" in refused.json()["detail"]

    batch = rita.post("/api/worklist/batch", json={"readers": ["ann", "bob", "rita"]})

    assert batch.status_code == 200
    handed = batch.json()
    assert [item["claimed_by"] for item in handed] == ["ann", "bob"]  # two cases, three readers
    assert {item["annotation_id"] for item in handed} == {first, second}
    with review.store.read() as session:
        batches = set(session.scalars(select(Selection.batch)))
    assert len(batches) == 1
    assert review.client("rita").post("/api/worklist/next").status_code == 404


def test_an_urgent_case_comes_first_and_is_recorded_as_urgent_not_as_the_strategy(
    review: Review,
) -> None:
    calm, _ = review.drafted(55)
    urgent, _ = review.drafted(56)
    with review.store.transaction() as session:
        session.get_one(Annotation, calm).scores = {"entropy": 0.9}
        session.get_one(Annotation, urgent).scores = {"entropy": 0.1}
    rita = review.client("rita")
    assert rita.put(f"/api/annotations/{urgent}/urgent", json={"urgent": True}).status_code == 200

    first = review.client("ann").post("/api/worklist/next").json()
    second = review.client("bob").post("/api/worklist/next").json()

    assert (first["annotation_id"], second["annotation_id"]) == (urgent, calm)
    with review.store.read() as session:
        recorded = {p.annotation_id: p for p in session.scalars(select(Selection))}
    assert recorded[urgent].strategy == "urgent" and recorded[urgent].value is None
    assert recorded[calm].strategy == "entropy" and recorded[calm].value == pytest.approx(0.9)


def test_changing_the_strategy_reranks_the_open_queue_and_a_missing_score_is_refused(
    review: Review,
) -> None:
    cases = [review.drafted(seed)[0] for seed in (57, 58, 59)]
    admin = review.client(_admin(review))
    assert (
        review.client("mo").put(f"/api/models/{MODEL}/strategy", json={"strategy": "random"})
    ).status_code == 403
    refused = admin.put(f"/api/models/{MODEL}/strategy", json={"strategy": "mc_dropout"})
    assert refused.status_code == 422
    assert "uncertainty.method: mc_dropout" in refused.json()["detail"]
    unknown = admin.put(f"/api/models/{MODEL}/strategy", json={"strategy": "bald"})
    assert unknown.status_code == 422

    orders = {}
    for seed in (1, 2, 3, 4):
        answer = admin.put(
            f"/api/models/{MODEL}/strategy", json={"strategy": "random", "seed": seed}
        )
        assert answer.status_code == 200
        listed = review.client("ann").get("/api/worklist").json()
        assert {item["selection"]["strategy"] for item in listed} == {"random"}
        assert {item["selection"]["seed"] for item in listed} == {seed}
        orders[seed] = [item["annotation_id"] for item in listed]
    assert all(sorted(order) == sorted(cases) for order in orders.values())
    assert len({tuple(order) for order in orders.values()}) > 1, "the seed changed nothing"
    shown = review.client("mo").get("/api/models/strategies").json()
    assert shown["models"][MODEL]["strategy"] == "random"
    assert shown["models"][MODEL]["changed_by"] == "ada"


def test_the_cli_sets_a_strategy_and_hands_a_batch_to_two_readers(
    review: Review, radloop_env: dict[str, str]
) -> None:
    first, _ = review.drafted(60)
    second, _ = review.drafted(61)

    (shown,) = radloop_json(radloop_env, "models", "strategy", MODEL, "diversity", "--seed", "2")
    assert (shown["strategy"], shown["seed"], shown["changed_by"][:4]) == ("diversity", 2, "cli:")
    refused = subprocess.run(
        [RADLOOP, "models", "strategy", MODEL, "flip_tta"],
        env=radloop_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and "uncertainty.method: flip_tta" in refused.stderr
    handed = radloop_json(radloop_env, "queue", "next", "--user", "ann", "--user", "bob")

    assert [row["claimed_by"] for row in handed] == ["ann", "bob"]
    assert {row["annotation_id"] for row in handed} == {first, second}
    assert {row["selection"]["strategy"] for row in handed} == {"diversity"}
    assert {row["selection"]["batch"] for row in handed} == {handed[0]["selection"]["batch"]}
