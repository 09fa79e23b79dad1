"""`/api`: liveness, who is asking, and the queue as readers see it."""

from typing import Any

from fastapi import APIRouter

from agents.review.cases import OPEN_STATES
from agents.review.deps import Reader, WorklistDep
from radloop.domain import AnnotationState

router = APIRouter(prefix="/api")


@router.get("/health", tags=["service"])
def health() -> dict[str, str]:
    """Liveness, without authentication and without clinical data."""
    return {"status": "ok"}


@router.get("/me", tags=["service"])
def me(who: Reader) -> dict[str, str]:
    return {"name": who.name, "role": who.role.value}


@router.get("/worklist", tags=["worklist"])
def api_worklist(
    who: Reader, worklist: WorklistDep, state: AnnotationState | None = None, limit: int = 500
) -> list[dict[str, Any]]:
    """Open cases by priority (or those in `state`), highest first."""
    states = (state,) if state else OPEN_STATES
    return worklist.items(states=states, limit=max(1, min(limit, 5000)))


@router.get("/counts", tags=["worklist"])
def api_counts(who: Reader, worklist: WorklistDep) -> dict[str, int]:
    return worklist.counts()
