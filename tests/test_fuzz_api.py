"""The review service's HTTP API, fuzzed from its own OpenAPI document (schemathesis), the
MONAI Label-compatible endpoints among it: every generated request is sent twice — with no
credentials, and with an administrator's token (who may do everything, so reaches the most
code). Anonymous, nothing but the public endpoints answers 2xx; nobody ever gets a 500. A 502,
503 or 504 is an answer on purpose: Orthanc, Triton and Prefect are not started here, and the
service says which one it could not reach.

On a real store with one drafted case, so ids that exist are among those tried.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import schemathesis
from hypothesis import event, given
from schemathesis.core.result import Err

from agents.review.auth import Users
from radloop.domain import Role
from tests.fuzz import budget
from tests.review_cases import Review

# Open to anyone: a load balancer's probe, and what a MONAI Label client asks before signing in.
PUBLIC = {
    ("GET", "/api/health"),
    ("GET", "/monailabel/auth/"),
    ("POST", "/monailabel/auth/token"),
}
BACKEND_DOWN = {502, 503, 504}


def test_every_operation_refuses_anonymous_callers_and_never_answers_500(review: Review) -> None:
    case, _ = review.drafted(51)
    admin = Users(review.store).add("ada", Role.ADMIN)
    schema = schemathesis.openapi.from_asgi("/openapi.json", review.app())
    operations = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()  # the service's own OpenAPI document is broken
        operations.append(result.ok())
    assert len(operations) > 30, [f"{op.method} {op.path}" for op in operations]
    seen: dict[str, set[int]] = {}

    for operation in operations:
        fuzz(operation, admin, seen)()

    # The admin's requests reached the service (some answered 200), and a drafted case was
    # there for generated ids to find.
    assert any(
        status == 200 for key, statuses in seen.items() if "admin" in key for status in statuses
    )
    assert case > 0


def fuzz(operation: Any, admin: str, seen: dict[str, set[int]]) -> Callable[[], None]:
    """The property for one operation, with its own generated requests."""
    name = (operation.method.upper(), operation.path)

    @given(case=operation.as_strategy())
    @budget(8)
    def check(case: Any) -> None:
        anonymous = case.call()
        signed_in = case.call(headers={"authorization": f"Bearer {admin}"})
        for who, answer in (("anonymous", anonymous), ("admin", signed_in)):
            event(f"{who} {answer.status_code}")
            seen.setdefault(f"{name[0]} {name[1]} {who}", set()).add(answer.status_code)
            assert answer.status_code < 500 or answer.status_code in BACKEND_DOWN, (
                f"{who}: {case.method} {case.formatted_path} -> {answer.status_code}: "
                f"{answer.text[:300]}"
            )
        if name not in PUBLIC:
            assert not 200 <= anonymous.status_code < 300, (
                f"anonymous {case.method} {case.formatted_path} answered "
                f"{anonymous.status_code}: {anonymous.text[:300]}"
            )

    return check
