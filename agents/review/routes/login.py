"""`/login` and `/logout`: browser sessions behind an HttpOnly, SameSite=Strict cookie; a new
one at each login, and 429 while the name or address is locked out after failed logins."""

import logging
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from agents.review.auth import LoginLocked
from agents.review.deps import (
    FormReader,
    ReviewSettingsDep,
    TemplatesDep,
    UsersDep,
    session_cookie,
    session_cookie_name,
)

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)


@router.get("/login")
def login_page(request: Request, templates: TemplatesDep, next: str = "/worklist") -> HTMLResponse:
    return templates.TemplateResponse(request, "login.html", {"next": _safe_next(next)})


@router.post("/login")
def login(
    request: Request,
    username: Annotated[str, Form()],
    password: Annotated[str, Form()],
    users: UsersDep,
    review: ReviewSettingsDep,
    templates: TemplatesDep,
    next: Annotated[str, Form()] = "/worklist",
) -> Response:
    try:
        opened = users.login(username, password, review.session_hours, _client(request))
    except LoginLocked as locked:
        log.info("login refused: locked out until %s (%s)", locked.until, _client(request))
        return templates.TemplateResponse(
            request,
            "login.html",
            {"next": _safe_next(next), "error": str(locked)},
            status_code=429,
            headers={"retry-after": str(locked.minutes * 60)},
        )
    if opened is None:
        log.info("failed login for a user name from %s", _client(request))
        return templates.TemplateResponse(
            request,
            "login.html",
            {"next": _safe_next(next), "error": "Wrong user name or password."},
            status_code=401,
        )
    # A new session for every login; the one this browser held before (perhaps planted by
    # someone else: session fixation) ends.
    if earlier := session_cookie(request):
        users.logout(earlier)
    cookie, who = opened
    log.info("%s logged in", who.name)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        session_cookie_name(review),
        cookie,
        max_age=int(review.session_hours * 3600),
        httponly=True,
        samesite="strict",
        secure=review.cookies_secure,
    )
    return response


@router.post("/logout")
def logout(
    request: Request, who: FormReader, users: UsersDep, review: ReviewSettingsDep
) -> RedirectResponse:
    if cookie := session_cookie(request):
        users.logout(cookie)
    response = RedirectResponse("/login", status_code=303)
    # With the attributes it was set with: a browser drops a `__Host-` cookie only so.
    response.delete_cookie(
        session_cookie_name(review), httponly=True, samesite="strict", secure=review.cookies_secure
    )
    return response


def _safe_next(target: str) -> str:
    """Only local paths: a login link must not send the reader to another site."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/worklist"
    return target


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"
