"""`/dashboard`: the queue and the training set at a glance, with its plots."""

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from sqlalchemy import func, select

from agents.review import plots
from agents.review.deps import PageReader, StoreDep, TemplatesDep, WorklistDep
from radloop.db import Label

router = APIRouter(include_in_schema=False)


@router.get("/dashboard")
def dashboard(
    request: Request,
    who: PageReader,
    store: StoreDep,
    worklist: WorklistDep,
    templates: TemplatesDep,
) -> Response:
    with store.read() as session:
        splits = dict(
            session.execute(select(Label.split, func.count()).group_by(Label.split)).all()
        )
    return templates.TemplateResponse(
        request,
        "dashboard.html",
        {"me": who, "counts": worklist.counts(), "splits": splits},
    )


@router.get("/dashboard/{name}.svg")
def dashboard_plot(name: str, who: PageReader, store: StoreDep, worklist: WorklistDep) -> Response:
    draw = plots.PLOTS.get(name)
    if draw is None:
        raise HTTPException(404, f"no plot {name!r}")
    return Response(draw(store, worklist.specs), media_type="image/svg+xml")
