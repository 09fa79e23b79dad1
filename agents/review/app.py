"""The review service: worklist pages, REST API, MONAI Label's API, the OHIF viewers (OHIF's
segmentation mode at the root, the build with MONAI Label's panel at `/ohif/`) and their
DICOMweb proxy.

One FastAPI app. `create_app` builds the service's objects, puts them on `app.state` (routes
reach them through `agents.review.deps`) and includes the routers of `agents.review.routes`.
Every route that reads or changes clinical data needs a user with a role: a browser session
(cookie, from the login page) or an API token (`Authorization: Bearer`). Pages change state
only through POST forms carrying the session's CSRF token; the session cookie is
SameSite=Strict, and the proxy's STOW accepts only multipart/related bodies, which a cross-site
HTML form cannot send.
"""

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import DataError, InterfaceError, OperationalError, StatementError

from agents.review.assist import Assistant
from agents.review.auth import LoginThrottle, Users
from agents.review.cases import ReviewError
from agents.review.deps import NotLoggedIn
from agents.review.headers import SecurityHeaders
from agents.review.proxy import DicomWebProxy, OhifHost
from agents.review.routes import (
    ai_viewer,
    annotations,
    api,
    dashboard,
    dicomweb,
    login,
    monailabel,
    users,
    viewer,
    worklist,
)
from agents.review.training import TrainingRequests
from agents.review.worklist import Worklist
from model_registry.inference import TritonBackend
from radloop.db import Store, utcnow
from radloop.modelspec import ModelSpec
from radloop.settings import Settings

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    store: Store,
    specs: dict[str, ModelSpec],
    clock: Callable[[], datetime] = utcnow,
) -> FastAPI:
    """The review service on `store`, checking corrections against `specs` (by model name);
    claims are measured against `clock`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await app.state.proxy.close()

    app = FastAPI(
        lifespan=lifespan,
        title="radloop review",
        summary="Worklist, corrections and validation of radloop's drafts; OHIF host.",
        version="1",
    )
    cases = Worklist(
        store,
        settings.review,
        specs,
        settings.spool_dir,
        settings.drafts_dir,
        settings.shared_store("datasets"),
        clock,
    )
    app.state.review_settings = settings.review
    app.state.store = store
    app.state.worklist = cases
    app.state.users = Users(
        store,
        LoginThrottle(
            store,
            settings.review.login_attempts,
            timedelta(minutes=settings.review.lockout_minutes),
        ),
    )
    app.state.templates = Jinja2Templates(directory=Path(__file__).with_name("templates"))
    app.state.proxy = DicomWebProxy(settings.orthanc, cases)
    app.state.ohif = OhifHost(settings.ohif_dir)
    app.state.ohif_ai = OhifHost(
        settings.ohif_ai_dir,
        base=ai_viewer.BASE,
        qido=ai_viewer.QIDO,
        wado=ai_viewer.WADO,
        useSharedArrayBuffer="FALSE",  # as the build ships: no cross-origin isolation here
    )

    app.add_exception_handler(ReviewError, _review_error)  # type: ignore[arg-type]
    app.add_exception_handler(NotLoggedIn, _not_logged_in)
    app.add_exception_handler(StatementError, _out_of_range)  # type: ignore[arg-type]
    # The viewer's catch-all `/{path:path}` goes last: it answers every GET the others did not.
    app.state.assistant = Assistant(
        store, cases, TritonBackend(settings.triton.base_url), settings.drafts_dir, clock
    )
    app.state.training = TrainingRequests(store, settings.prefect.effective_api_url)
    routers = (
        api,
        annotations,
        monailabel,
        users,
        login,
        worklist,
        dashboard,
        dicomweb,
        ai_viewer,
        viewer,
    )
    for routes in routers:
        app.include_router(routes.router)
    app.add_middleware(SecurityHeaders, https=settings.review.cookies_secure)
    return app


async def _review_error(request: Request, error: ReviewError) -> JSONResponse:
    # The reason names internal ids and UIDs only; the operator sees what clients were told.
    log.info("%s %s refused (%d): %s", request.method, request.url.path, error.status, error)
    return JSONResponse({"detail": str(error)}, status_code=error.status)


# How long a client is asked to wait before it tries again while the database is away.
RETRY_AFTER_SECONDS = 5


async def _out_of_range(request: Request, error: StatementError) -> JSONResponse:
    """A request value the database cannot hold (an id beyond PostgreSQL's integer, a date
    past year 9999) is the client's error, found by tests/test_fuzz_api.py. A database that
    cannot be reached (PostgreSQL down or restarting, SQLite locked past its wait) is a 503
    that asks the client to send the request again: the request's transaction was rolled
    back, so nothing of it is kept. Any other database error stays a 500."""
    if isinstance(error, DataError) or isinstance(error.orig, OverflowError):
        return JSONResponse({"detail": "a value is out of the range radloop stores"}, 422)
    if isinstance(error, OperationalError | InterfaceError):
        log.warning(
            "%s %s: database unavailable (%s)", request.method, request.url.path, type(error.orig)
        )
        return JSONResponse(
            {"detail": "the database is unavailable; nothing was changed, try again shortly"},
            status_code=503,
            headers={"retry-after": str(RETRY_AFTER_SECONDS)},
        )
    raise error


async def _not_logged_in(request: Request, error: Exception) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
