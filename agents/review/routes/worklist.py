"""The worklist page (`/worklist`) and its forms: open, claim, release, accept, validate and
mark urgent a case. A refused action shows the page again with the reason (409)."""

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from agents.review.auth import CORRECT, VALIDATE, Principal
from agents.review.cases import ReviewError
from agents.review.deps import (
    FormReviewer,
    PageReader,
    ReviewSettingsDep,
    TemplatesDep,
    WorklistDep,
    form_user,
)
from agents.review.worklist import Worklist
from radloop.domain import AnnotationState, Role
from radloop.settings import ReviewSettings

router = APIRouter(include_in_schema=False)

# A form action: what it does to the case, and where the browser goes next (None: the worklist).
Action = Callable[[Worklist, int, Principal], str | None]


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/worklist", status_code=303)


def render_worklist(
    request: Request,
    who: Principal,
    worklist: Worklist,
    review: ReviewSettings,
    templates: Jinja2Templates,
    error: str | None = None,
) -> Response:
    return templates.TemplateResponse(
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


@router.get("/worklist")
def worklist_page(
    request: Request,
    who: PageReader,
    worklist: WorklistDep,
    review: ReviewSettingsDep,
    templates: TemplatesDep,
) -> Response:
    return render_worklist(request, who, worklist, review, templates)


def _form_action(roles: frozenset[Role], act: Action) -> Callable[..., Response]:
    def endpoint(
        annotation_id: int,
        request: Request,
        who: Annotated[Principal, Depends(form_user(roles))],
        worklist: WorklistDep,
        review: ReviewSettingsDep,
        templates: TemplatesDep,
    ) -> Response:
        try:
            target = act(worklist, annotation_id, who)
        except ReviewError as refused:
            return render_worklist(request, who, worklist, review, templates, str(refused))
        return RedirectResponse(target or "/worklist", status_code=303)

    return endpoint


def _open(worklist: Worklist, annotation_id: int, who: Principal) -> str:
    item = worklist.claim(annotation_id, who.name)
    return f"/segmentation?StudyInstanceUIDs={item['study_uid']}"


def _claim(worklist: Worklist, annotation_id: int, who: Principal) -> None:
    worklist.claim(annotation_id, who.name)


def _release(worklist: Worklist, annotation_id: int, who: Principal) -> None:
    worklist.release(annotation_id, who.name, force=who.may(VALIDATE))


def _accept(worklist: Worklist, annotation_id: int, who: Principal) -> None:
    worklist.accept_draft(annotation_id, who.name)


def _validate(worklist: Worklist, annotation_id: int, who: Principal) -> None:
    worklist.validate(annotation_id, who.name)


_ACTIONS: dict[str, tuple[frozenset[Role], Action]] = {
    "open": (CORRECT, _open),
    "claim": (CORRECT, _claim),
    "release": (CORRECT, _release),
    "accept": (CORRECT, _accept),
    "validate": (VALIDATE, _validate),
}
for _name, (_roles, _act) in _ACTIONS.items():
    router.add_api_route(
        f"/worklist/{{annotation_id}}/{_name}", _form_action(_roles, _act), methods=["POST"]
    )


@router.post("/worklist/{annotation_id}/urgent")
def urgent_form(
    annotation_id: int,
    request: Request,
    who: FormReviewer,
    worklist: WorklistDep,
    review: ReviewSettingsDep,
    templates: TemplatesDep,
    urgent: Annotated[str, Form()] = "true",
) -> Response:
    try:
        worklist.set_urgent(annotation_id, urgent == "true")
    except ReviewError as refused:
        return render_worklist(request, who, worklist, review, templates, str(refused))
    return RedirectResponse("/worklist", status_code=303)
