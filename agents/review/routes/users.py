"""`/api/users`: radloop's users, for admins."""

from typing import Any

from fastapi import APIRouter

from agents.review.deps import Administrator, UsersDep

router = APIRouter(prefix="/api", tags=["service"])


@router.get("/users")
def api_users(who: Administrator, users: UsersDep) -> list[Any]:
    return users.list()
