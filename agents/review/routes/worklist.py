"""The worklist page (`/worklist`) and its forms: open (in OHIF's segmentation mode, or with AI
tools in the OHIF build with MONAI Label's panel), claim, release, accept the draft or the
reader's latest click-guided refinement, validate and mark urgent a case. A refused action shows
the page again with the reason (409)."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from agents.review.assist import Assistant
from agents.review.auth import CORRECT, VALIDATE, Principal
from agents.review.cases import ReviewError
from agents.review.deps import (
    AssistantDep,
    FormReviewer,
    OhifAiDep,
    PageReader,
    ReviewSettingsDep,
    TemplatesDep,
    form_user,
)
from agents.review.proxy import OhifHost
from agents.review.routes.ai_viewer import BASE as AI_VIEWER
from radloop.domain import AnnotationState, Role
from radloop.settings import ReviewSettings

router = APIRouter(include_in_schema=False)


@dataclass(frozen=True)
class WorklistPage:
    assistant: Assistant
    review: ReviewSettings
    templates: Jinja2Templates
    ai_viewer: OhifHost

    def render(self, request: Request, who: Principal, error: str | None = None) -> Response:
        worklist = self.assistant.worklist
        return self.templates.TemplateResponse(
            request,
            "worklist.html",
            {
                "me": who,
                "items": worklist.items(),
                "corrected": worklist.items(states=(AnnotationState.CORRECTED,)),
                "counts": worklist.counts(),
                "strategies": worklist.order.settings(),
                "lease_minutes": self.review.lease_minutes,
                "can_correct": who.may(CORRECT),
                "can_validate": who.may(VALIDATE),
                "ai_tools": self.ai_viewer.installed,
                "refined": self.assistant.refined_cases(who.name),
                "error": error,
            },
            status_code=200 if error is None else 409,
        )


def worklist_page_dep(
    assistant: AssistantDep, review: ReviewSettingsDep, templates: TemplatesDep, ohif: OhifAiDep
) -> WorklistPage:
    return WorklistPage(assistant, review, templates, ohif)


PageDep = Annotated[WorklistPage, Depends(worklist_page_dep)]

# A form action: what it does to the case, and where the browser goes next (None: the worklist).
Action = Callable[[Assistant, int, Principal], str | None]


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/worklist", status_code=303)


@router.get("/worklist")
def worklist_page(request: Request, who: PageReader, page: PageDep) -> Response:
    return page.render(request, who)


def _form_action(roles: frozenset[Role], act: Action) -> Callable[..., Response]:
    def endpoint(
        annotation_id: int,
        request: Request,
        who: Annotated[Principal, Depends(form_user(roles))],
        page: PageDep,
    ) -> Response:
        try:
            target = act(page.assistant, annotation_id, who)
        except ReviewError as refused:
            return page.render(request, who, str(refused))
        return RedirectResponse(target or "/worklist", status_code=303)

    return endpoint


def _open(assistant: Assistant, annotation_id: int, who: Principal) -> str:
    item = assistant.worklist.claim(annotation_id, who.name)
    return f"/segmentation?StudyInstanceUIDs={item['study_uid']}"


def _open_ai(assistant: Assistant, annotation_id: int, who: Principal) -> str:
    item = assistant.worklist.claim(annotation_id, who.name)
    return f"{AI_VIEWER}monai-label?StudyInstanceUIDs={item['study_uid']}"


def _claim(assistant: Assistant, annotation_id: int, who: Principal) -> None:
    assistant.worklist.claim(annotation_id, who.name)


def _release(assistant: Assistant, annotation_id: int, who: Principal) -> None:
    assistant.worklist.release(annotation_id, who.name, force=who.may(VALIDATE))


def _accept(assistant: Assistant, annotation_id: int, who: Principal) -> None:
    assistant.worklist.accept_draft(annotation_id, who.name)


def _accept_refined(assistant: Assistant, annotation_id: int, who: Principal) -> None:
    assistant.accept_refined(annotation_id, who.name)


def _validate(assistant: Assistant, annotation_id: int, who: Principal) -> None:
    assistant.worklist.validate(annotation_id, who.name)


_ACTIONS: dict[str, tuple[frozenset[Role], Action]] = {
    "open": (CORRECT, _open),
    "open-ai": (CORRECT, _open_ai),
    "claim": (CORRECT, _claim),
    "release": (CORRECT, _release),
    "accept": (CORRECT, _accept),
    "accept-refined": (CORRECT, _accept_refined),
    "validate": (VALIDATE, _validate),
}
for _name, (_roles, _act) in _ACTIONS.items():
    router.add_api_route(
        f"/worklist/{{annotation_id}}/{_name}", _form_action(_roles, _act), methods=["POST"]
    )


@router.post("/worklist/next")
def next_case_form(
    request: Request,
    who: Annotated[Principal, Depends(form_user(CORRECT))],
    page: PageDep,
) -> Response:
    """Open the case the caller holds, else claim the one the strategy picks next, in OHIF."""
    case = page.assistant.next_case(who.name)
    if case is None:
        return page.render(request, who, "no case is waiting that you could open")
    return RedirectResponse(f"/segmentation?StudyInstanceUIDs={case['study_uid']}", status_code=303)


@router.post("/worklist/{annotation_id}/urgent")
def urgent_form(
    annotation_id: int,
    request: Request,
    who: FormReviewer,
    page: PageDep,
    urgent: Annotated[str, Form()] = "true",
) -> Response:
    try:
        page.assistant.worklist.set_urgent(annotation_id, urgent == "true", who.name)
    except ReviewError as refused:
        return page.render(request, who, str(refused))
    return RedirectResponse("/worklist", status_code=303)
