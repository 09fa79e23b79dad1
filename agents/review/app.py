"""The review service: worklist pages, REST API, the OHIF viewer and its DICOMweb proxy.

(No `from __future__ import annotations` here: FastAPI reads the routes' annotations, which
name dependencies built inside `create_app`, at definition time.)

One FastAPI app. Every route that reads or changes clinical data needs a user with a role:
a browser session (cookie, from the login page) or an API token (`Authorization: Bearer`).
Pages change state only through POST forms carrying the session's CSRF token; the session
cookie is SameSite=Strict, and the proxy's STOW accepts only multipart/related bodies, which a
cross-site HTML form cannot send.
"""

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel
from sqlalchemy import func, select

from agents.review import plots
from agents.review.auth import ADMINISTER, CORRECT, READ, VALIDATE, Principal, Users
from agents.review.corrections import is_dicom, is_nifti
from agents.review.proxy import DicomWebProxy, OhifHost
from agents.review.worklist import OPEN_STATES, ReviewError, Worklist
from radloop.db import Label, Store
from radloop.domain import AnnotationState, Role
from radloop.modelspec import ModelSpec
from radloop.settings import Settings

log = logging.getLogger(__name__)

SESSION_COOKIE = "radloop_session"
TEMPLATES = Jinja2Templates(directory=Path(__file__).with_name("templates"))


class NotLoggedIn(Exception):
    """A page asked for without a session: answered with a redirect to the login page."""


class UrgentBody(BaseModel):
    urgent: bool


def create_app(settings: Settings, store: Store, specs: dict[str, ModelSpec]) -> FastAPI:
    review = settings.review
    users = Users(store)
    worklist = Worklist(
        store, review, specs, settings.spool_dir, settings.drafts_dir, settings.datasets_dir
    )
    proxy = DicomWebProxy(settings.orthanc, worklist)
    ohif = OhifHost(settings.ohif_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await proxy.close()

    app = FastAPI(
        lifespan=lifespan,
        title="radloop review",
        summary="Worklist, corrections and validation of radloop's drafts; OHIF host.",
        version="1",
    )
    app.state.worklist = worklist
    app.state.users = users

    @app.exception_handler(ReviewError)
    async def review_error(request: Request, error: ReviewError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.exception_handler(NotLoggedIn)
    async def not_logged_in(request: Request, error: NotLoggedIn) -> RedirectResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target)}", status_code=303)

    # -- who is asking ----------------------------------------------------------------

    def principal_of(request: Request) -> Principal | None:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return users.by_token(header[7:].strip())
        cookie = request.cookies.get(SESSION_COOKIE)
        return users.by_session(cookie) if cookie else None

    def api_user(roles: frozenset[Role]) -> Callable[[Request], Awaitable[Principal]]:
        async def dependency(request: Request) -> Principal:
            who = await run_in_threadpool(principal_of, request)
            if who is None:
                raise HTTPException(
                    401, "log in or send an API token", headers={"WWW-Authenticate": "Bearer"}
                )
            _require(who, roles)
            # A cookie-authenticated API call that changes state must prove it came from our
            # pages (the token a session's pages carry); token calls cannot be forged cross-site.
            if who.csrf_token and request.method not in ("GET", "HEAD", "OPTIONS"):
                sent = request.headers.get("x-csrf-token")
                if sent != who.csrf_token and not _is_multipart_related(request):
                    raise HTTPException(403, "missing or wrong X-CSRF-Token header")
            return who

        return dependency

    def page_user(roles: frozenset[Role]) -> Callable[[Request], Awaitable[Principal]]:
        async def dependency(request: Request) -> Principal:
            cookie = request.cookies.get(SESSION_COOKIE)
            who = await run_in_threadpool(users.by_session, cookie) if cookie else None
            if who is None:
                raise NotLoggedIn()
            _require(who, roles)
            return who

        return dependency

    def form_user(roles: frozenset[Role]) -> Callable[..., Awaitable[Principal]]:
        async def dependency(
            request: Request, csrf_token: Annotated[str, Form()] = ""
        ) -> Principal:
            who = await page_user(roles)(request)
            if csrf_token != who.csrf_token:
                raise HTTPException(403, "the form is stale or forged (CSRF token); reload")
            return who

        return dependency

    Reader = Annotated[Principal, Depends(api_user(READ))]
    Corrector = Annotated[Principal, Depends(api_user(CORRECT))]
    Reviewer = Annotated[Principal, Depends(api_user(VALIDATE))]

    # -- REST API ---------------------------------------------------------------------

    @app.get("/api/health", tags=["service"])
    def health() -> dict[str, str]:
        """Liveness, without authentication and without clinical data."""
        return {"status": "ok"}

    @app.get("/api/me", tags=["service"])
    def me(who: Reader) -> dict[str, str]:
        return {"name": who.name, "role": who.role.value}

    @app.get("/api/worklist", tags=["worklist"])
    def api_worklist(
        who: Reader, state: AnnotationState | None = None, limit: int = 500
    ) -> list[dict[str, Any]]:
        """Open cases by priority (or those in `state`), highest first."""
        states = (state,) if state else OPEN_STATES
        return worklist.items(states=states, limit=max(1, min(limit, 5000)))

    @app.get("/api/counts", tags=["worklist"])
    def api_counts(who: Reader) -> dict[str, int]:
        return worklist.counts()

    @app.get("/api/annotations/{annotation_id}", tags=["annotations"])
    def api_annotation(annotation_id: int, who: Reader) -> dict[str, Any]:
        return worklist.item(annotation_id)

    @app.post("/api/annotations/{annotation_id}/claim", tags=["annotations"])
    def api_claim(annotation_id: int, who: Corrector) -> dict[str, Any]:
        """Hold the case for `review.lease_minutes`; claiming again renews the lease."""
        return worklist.claim(annotation_id, who.name)

    @app.post("/api/annotations/{annotation_id}/release", tags=["annotations"])
    def api_release(annotation_id: int, who: Corrector) -> dict[str, Any]:
        return worklist.release(annotation_id, who.name, force=who.may(VALIDATE))

    @app.post("/api/annotations/{annotation_id}/accept", tags=["annotations"])
    def api_accept(annotation_id: int, who: Corrector) -> dict[str, Any]:
        """The claimed draft needs no change: it becomes the correction (Dice 1)."""
        return worklist.accept_draft(annotation_id, who.name)

    @app.put("/api/annotations/{annotation_id}/label", tags=["annotations"])
    async def api_label(annotation_id: int, request: Request, who: Corrector) -> dict[str, Any]:
        """Upload the correction of a claimed case as a DICOM SEG or a NIfTI label map
        (`.nii`/`.nii.gz` on the draft series' grid, values = the spec's label numbers)."""
        data = await request.body()
        if is_dicom(data):
            return await run_in_threadpool(worklist.correct_with_seg, annotation_id, who.name, data)
        if is_nifti(data):
            return await run_in_threadpool(
                worklist.correct_with_nifti, annotation_id, who.name, data
            )
        raise HTTPException(415, "the body is neither a DICOM SEG (Part 10) nor a NIfTI file")

    @app.post("/api/annotations/{annotation_id}/validate", tags=["annotations"])
    def api_validate(annotation_id: int, who: Reviewer) -> dict[str, Any]:
        """Accept the correction as a training label (train or frozen holdout)."""
        return worklist.validate(annotation_id, who.name)

    @app.put("/api/annotations/{annotation_id}/urgent", tags=["annotations"])
    def api_urgent(annotation_id: int, body: UrgentBody, who: Reviewer) -> dict[str, Any]:
        return worklist.set_urgent(annotation_id, body.urgent)

    @app.get("/api/users", tags=["service"])
    def api_users(who: Annotated[Principal, Depends(api_user(ADMINISTER))]) -> list[Any]:
        return users.list()

    # -- pages ------------------------------------------------------------------------

    @app.get("/login", include_in_schema=False)
    def login_page(request: Request, next: str = "/worklist") -> HTMLResponse:
        return TEMPLATES.TemplateResponse(request, "login.html", {"next": _safe_next(next)})

    @app.post("/login", include_in_schema=False)
    def login(
        request: Request,
        username: Annotated[str, Form()],
        password: Annotated[str, Form()],
        next: Annotated[str, Form()] = "/worklist",
    ) -> Response:
        opened = users.login(username, password, review.session_hours)
        if opened is None:
            log.info("failed login for a user name from %s", _client(request))
            return TEMPLATES.TemplateResponse(
                request,
                "login.html",
                {"next": _safe_next(next), "error": "Wrong user name or password."},
                status_code=401,
            )
        cookie, who = opened
        log.info("%s logged in", who.name)
        response = RedirectResponse(_safe_next(next), status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            cookie,
            max_age=int(review.session_hours * 3600),
            httponly=True,
            samesite="strict",
            secure=review.secure_cookies,
        )
        return response

    @app.post("/logout", include_in_schema=False)
    def logout(
        request: Request, who: Annotated[Principal, Depends(form_user(READ))]
    ) -> RedirectResponse:
        users.logout(request.cookies[SESSION_COOKIE])
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/worklist", status_code=303)

    def render_worklist(request: Request, who: Principal, error: str | None = None) -> Response:
        return TEMPLATES.TemplateResponse(
            request,
            "worklist.html",
            {
                "me": who,
                "items": worklist.items(),
                "corrected": worklist.items(states=(AnnotationState.CORRECTED,)),
                "counts": worklist.counts(),
                "boost": review.urgency_boost,
                "lease_minutes": review.lease_minutes,
                "can_correct": who.may(CORRECT),
                "can_validate": who.may(VALIDATE),
                "error": error,
            },
            status_code=200 if error is None else 409,
        )

    @app.get("/worklist", include_in_schema=False)
    def worklist_page(
        request: Request, who: Annotated[Principal, Depends(page_user(READ))]
    ) -> Response:
        return render_worklist(request, who)

    def form_action(
        roles: frozenset[Role], act: Callable[[int, Principal, Request], str | None]
    ) -> Callable[..., Response]:
        def endpoint(
            annotation_id: int,
            request: Request,
            who: Annotated[Principal, Depends(form_user(roles))],
        ) -> Response:
            try:
                target = act(annotation_id, who, request)
            except ReviewError as refused:
                return render_worklist(request, who, str(refused))
            return RedirectResponse(target or "/worklist", status_code=303)

        return endpoint

    def open_case(annotation_id: int, who: Principal, request: Request) -> str:
        item = worklist.claim(annotation_id, who.name)
        return f"/segmentation?StudyInstanceUIDs={item['study_uid']}"

    actions: dict[str, tuple[frozenset[Role], Callable[[int, Principal, Request], str | None]]] = {
        "open": (CORRECT, open_case),
        "claim": (CORRECT, lambda i, who, _: _none(worklist.claim(i, who.name))),
        "release": (
            CORRECT,
            lambda i, who, _: _none(worklist.release(i, who.name, force=who.may(VALIDATE))),
        ),
        "accept": (CORRECT, lambda i, who, _: _none(worklist.accept_draft(i, who.name))),
        "validate": (VALIDATE, lambda i, who, _: _none(worklist.validate(i, who.name))),
    }
    for name, (roles, act) in actions.items():
        app.add_api_route(
            f"/worklist/{{annotation_id}}/{name}",
            form_action(roles, act),
            methods=["POST"],
            include_in_schema=False,
        )

    @app.post("/worklist/{annotation_id}/urgent", include_in_schema=False)
    def urgent_form(
        annotation_id: int,
        request: Request,
        who: Annotated[Principal, Depends(form_user(VALIDATE))],
        urgent: Annotated[str, Form()] = "true",
    ) -> Response:
        try:
            worklist.set_urgent(annotation_id, urgent == "true")
        except ReviewError as refused:
            return render_worklist(request, who, str(refused))
        return RedirectResponse("/worklist", status_code=303)

    @app.get("/dashboard", include_in_schema=False)
    def dashboard(
        request: Request, who: Annotated[Principal, Depends(page_user(READ))]
    ) -> Response:
        with store.read() as session:
            splits = dict(
                session.execute(select(Label.split, func.count()).group_by(Label.split)).all()
            )
        return TEMPLATES.TemplateResponse(
            request,
            "dashboard.html",
            {"me": who, "counts": worklist.counts(), "splits": splits},
        )

    @app.get("/dashboard/{name}.svg", include_in_schema=False)
    def dashboard_plot(name: str, who: Annotated[Principal, Depends(page_user(READ))]) -> Response:
        draw = plots.PLOTS.get(name)
        if draw is None:
            raise HTTPException(404, f"no plot {name!r}")
        return Response(draw(store), media_type="image/svg+xml")

    # -- DICOMweb proxy and the viewer ------------------------------------------------

    proxy.mount(app, reader=api_user(READ), corrector=api_user(CORRECT))
    ohif.mount(app, page_user(READ))
    return app


def _require(who: Principal, roles: frozenset[Role]) -> None:
    if not who.may(roles):
        allowed = ", ".join(sorted(role.value for role in roles))
        raise HTTPException(403, f"role {who.role.value} may not do this (needs {allowed})")


def _is_multipart_related(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/related")


def _safe_next(target: str) -> str:
    """Only local paths: a login link must not send the reader to another site."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/worklist"
    return target


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _none(_: object) -> None:
    return None
