"""`/api`: liveness, who is asking, the queue as readers see it, and the audit log."""

from typing import Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import AwareDatetime, BaseModel, Field

from agents.review.auth import CORRECT
from agents.review.cases import OPEN_STATES
from agents.review.deps import Administrator, Corrector, Reader, Reviewer, UsersDep, WorklistDep
from agents.selection import STRATEGIES
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
    """Open cases in the worklist's order (urgent, then each model's strategy), or those in
    `state`; each with its rank and selection."""
    states = (state,) if state else OPEN_STATES
    return worklist.items(states=states, limit=max(1, min(limit, 5000)))


class BatchBody(BaseModel):
    # Readers asking for work at once: one case each, chosen together.
    readers: list[str] = Field(min_length=1, max_length=50)
    model: str | None = None


class StrategyBody(BaseModel):
    strategy: str
    seed: int | None = Field(None, ge=0)


@router.post("/worklist/next", tags=["worklist"])
def api_next(
    who: Corrector, worklist: WorklistDep, model: str | None = None, strategy: str | None = None
) -> dict[str, Any]:
    """Claim the case the model's active-learning strategy (or `strategy`, this once) picks
    next for the caller; 404 when none waits. The pick is recorded as a selection."""
    _known_strategy(strategy)
    given = worklist.next_cases([who.name], model=model, strategy=strategy)
    if not given:
        raise HTTPException(404, "no case is waiting that you could open")
    return given[0]


@router.post("/worklist/batch", tags=["worklist"])
def api_batch(
    body: BatchBody, who: Reviewer, worklist: WorklistDep, users: UsersDep
) -> list[dict[str, Any]]:
    """Hand one case to each of `readers`, chosen together (a diversity-aware strategy gives
    no two of them near-duplicates), each claimed for its reader; fewer cases than readers:
    the last readers get none."""
    if len(set(body.readers)) != len(body.readers):
        raise HTTPException(422, "each reader once")
    for name in body.readers:
        user = users.find(name)
        if user is None or not user.may(CORRECT):
            raise HTTPException(422, f"{name!r} is not a user who may correct labels")
    return worklist.next_cases(body.readers, model=body.model)


@router.get("/models/strategies", tags=["models"])
def api_strategies(who: Reader, worklist: WorklistDep) -> dict[str, Any]:
    """Each model's active-learning strategy and seed, and the strategies there are."""
    return {
        "known": sorted(STRATEGIES),
        "models": {
            name: {
                "strategy": chosen.strategy,
                "seed": chosen.seed,
                "changed_by": chosen.changed_by,
                "changed_at": chosen.changed_at.isoformat() if chosen.changed_at else None,
            }
            for name, chosen in worklist.order.settings().items()
        },
    }


@router.put("/models/{model}/strategy", tags=["models"])
def api_set_strategy(
    model: str, body: StrategyBody, who: Administrator, worklist: WorklistDep
) -> dict[str, Any]:
    """Set the model's active-learning strategy: its open cases are ranked by it at once."""
    return worklist.set_strategy(model, body.strategy, body.seed, who.name)


def _known_strategy(name: str | None) -> None:
    if name is not None and name not in STRATEGIES:
        raise HTTPException(
            422, f"unknown strategy {name!r} (known: {', '.join(sorted(STRATEGIES))})"
        )


@router.get("/counts", tags=["worklist"])
def api_counts(who: Reader, worklist: WorklistDep) -> dict[str, int]:
    return worklist.counts()


@router.get("/audit", tags=["service"])
def api_audit(
    who: Administrator,
    worklist: WorklistDep,
    user: str | None = None,
    study_id: int | None = None,
    since: AwareDatetime | None = None,
    limit: int = Query(1000, ge=1, le=100_000),
) -> list[dict[str, Any]]:
    """Who viewed, claimed, changed or validated which case (internal ids), newest first."""
    return worklist.audit.events(user, study_id, since, limit)
