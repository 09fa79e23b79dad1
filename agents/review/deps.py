"""What the review service's routes depend on, as FastAPI `Annotated` dependencies.

The objects `create_app` builds live on `app.state` and are reached only through the
`...Dep` aliases here, so a route names what it needs and nothing is built at import. Who is
asking is a `Principal` with a role: an API caller (`Authorization: Bearer` token, or the
session cookie plus the session's `X-CSRF-Token` for a call that changes state), a page
viewer (session cookie; without one the page answers with a redirect to the login page), or a
form sender (session cookie and the form's CSRF token). Script on our pages sends the CSRF token
as `X-CSRF-Token`, or as `X-XSRF-TOKEN` from the `XSRF-TOKEN` cookie the AI viewer's page sets
(the double-submit header axios sends by itself, so MONAI Label's OHIF panel can POST).
"""

from collections.abc import Awaitable, Callable
from typing import Annotated, cast

from fastapi import Depends, Form, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.templating import Jinja2Templates

from agents.review.assist import Assistant
from agents.review.auth import ADMINISTER, CORRECT, READ, VALIDATE, Principal, Users
from agents.review.proxy import DicomWebProxy, OhifHost
from agents.review.training import TrainingRequests
from agents.review.worklist import Worklist
from radloop.db import Store
from radloop.domain import Role
from radloop.settings import ReviewSettings

SESSION_COOKIE = "radloop_session"
# The double-submit pair axios (in OHIF's MONAI Label panel) reads and sends by default.
XSRF_COOKIE = "XSRF-TOKEN"
XSRF_HEADER = "x-xsrf-token"


class NotLoggedIn(Exception):
    """A page asked for without a session: answered with a redirect to the login page."""


# -- what create_app built (app.state) ----------------------------------------------------


async def get_review_settings(request: Request) -> ReviewSettings:
    return cast(ReviewSettings, request.app.state.review_settings)


def session_cookie_name(review: ReviewSettings) -> str:
    """With Secure cookies, the `__Host-` prefix (OWASP ASVS 3.4.4): a browser then keeps the
    cookie only when this very host set it over HTTPS, with Path=/ and no Domain, so a sibling
    subdomain can neither plant nor overwrite a session. Browsers refuse the prefix without
    Secure: a plain-HTTP service (on loopback) keeps the bare name."""
    return f"__Host-{SESSION_COOKIE}" if review.cookies_secure else SESSION_COOKIE


def session_cookie(request: Request) -> str | None:
    """The session cookie the request carries, under the name this service gives it."""
    return request.cookies.get(session_cookie_name(request.app.state.review_settings))


async def get_store(request: Request) -> Store:
    return cast(Store, request.app.state.store)


async def get_worklist(request: Request) -> Worklist:
    return cast(Worklist, request.app.state.worklist)


async def get_users(request: Request) -> Users:
    return cast(Users, request.app.state.users)


async def get_templates(request: Request) -> Jinja2Templates:
    return cast(Jinja2Templates, request.app.state.templates)


async def get_proxy(request: Request) -> DicomWebProxy:
    return cast(DicomWebProxy, request.app.state.proxy)


async def get_ohif(request: Request) -> OhifHost:
    return cast(OhifHost, request.app.state.ohif)


async def get_ohif_ai(request: Request) -> OhifHost:
    return cast(OhifHost, request.app.state.ohif_ai)


async def get_assistant(request: Request) -> Assistant:
    return cast(Assistant, request.app.state.assistant)


async def get_training(request: Request) -> TrainingRequests:
    return cast(TrainingRequests, request.app.state.training)


ReviewSettingsDep = Annotated[ReviewSettings, Depends(get_review_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
WorklistDep = Annotated[Worklist, Depends(get_worklist)]
UsersDep = Annotated[Users, Depends(get_users)]
TemplatesDep = Annotated[Jinja2Templates, Depends(get_templates)]
ProxyDep = Annotated[DicomWebProxy, Depends(get_proxy)]
OhifDep = Annotated[OhifHost, Depends(get_ohif)]
OhifAiDep = Annotated[OhifHost, Depends(get_ohif_ai)]
AssistantDep = Annotated[Assistant, Depends(get_assistant)]
TrainingDep = Annotated[TrainingRequests, Depends(get_training)]

# -- who is asking ------------------------------------------------------------------------


def principal_of(request: Request, users: Users) -> Principal | None:
    """The user behind an API token or a session's bearer token (MONAI Label's `/auth/token`),
    else behind the session cookie; None when none of them."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        token = header[7:].strip()
        return users.by_token(token) or users.by_session(token, bearer=True)
    cookie = session_cookie(request)
    return users.by_session(cookie) if cookie else None


async def page_principal(request: Request, users: Users, roles: frozenset[Role]) -> Principal:
    """The session's user, if their role is one of `roles`: `NotLoggedIn` without a session,
    403 for another role."""
    cookie = session_cookie(request)
    who = await run_in_threadpool(users.by_session, cookie) if cookie else None
    if who is None:
        raise NotLoggedIn()
    require(who, roles)
    return who


def api_user(roles: frozenset[Role]) -> Callable[..., Awaitable[Principal]]:
    """Dependency: an API caller with one of `roles` (401 without credentials, 403 else)."""

    async def dependency(request: Request, users: UsersDep) -> Principal:
        who = await run_in_threadpool(principal_of, request, users)
        if who is None:
            raise HTTPException(
                401, "log in or send an API token", headers={"WWW-Authenticate": "Bearer"}
            )
        require(who, roles)
        # A cookie-authenticated API call that changes state must prove it came from our
        # pages (the token a session's pages carry); token calls cannot be forged cross-site.
        if who.csrf_token and request.method not in ("GET", "HEAD", "OPTIONS"):
            sent = request.headers.get("x-csrf-token") or request.headers.get(XSRF_HEADER)
            if sent != who.csrf_token and not _is_multipart_related(request):
                raise HTTPException(403, "missing or wrong X-CSRF-Token header")
        return who

    return dependency


def page_user(roles: frozenset[Role]) -> Callable[..., Awaitable[Principal]]:
    """Dependency: a page viewer with one of `roles` (see `page_principal`)."""

    async def dependency(request: Request, users: UsersDep) -> Principal:
        return await page_principal(request, users, roles)

    return dependency


def form_user(roles: frozenset[Role]) -> Callable[..., Awaitable[Principal]]:
    """Dependency: a page viewer with one of `roles` whose form carries the session's CSRF
    token (403 when it does not)."""

    async def dependency(
        request: Request, users: UsersDep, csrf_token: Annotated[str, Form()] = ""
    ) -> Principal:
        who = await page_principal(request, users, roles)
        if csrf_token != who.csrf_token:
            raise HTTPException(403, "the form is stale or forged (CSRF token); reload")
        return who

    return dependency


def require(who: Principal, roles: frozenset[Role]) -> None:
    """403 unless `who`'s role is one of `roles`."""
    if not who.may(roles):
        allowed = ", ".join(sorted(role.value for role in roles))
        raise HTTPException(403, f"role {who.role.value} may not do this (needs {allowed})")


def _is_multipart_related(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/related")


Reader = Annotated[Principal, Depends(api_user(READ))]
Corrector = Annotated[Principal, Depends(api_user(CORRECT))]
Reviewer = Annotated[Principal, Depends(api_user(VALIDATE))]
Administrator = Annotated[Principal, Depends(api_user(ADMINISTER))]
PageReader = Annotated[Principal, Depends(page_user(READ))]
FormReader = Annotated[Principal, Depends(form_user(READ))]
FormReviewer = Annotated[Principal, Depends(form_user(VALIDATE))]
