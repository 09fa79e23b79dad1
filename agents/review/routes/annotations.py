"""`/api/annotations/{id}`: one case, and what readers and reviewers do to it."""

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from agents.review.auth import VALIDATE
from agents.review.corrections import is_dicom, is_label_volume
from agents.review.deps import AssistantDep, Corrector, Reader, Reviewer, WorklistDep

router = APIRouter(prefix="/api/annotations", tags=["annotations"])


class UrgentBody(BaseModel):
    urgent: bool


@router.get("/{annotation_id}")
def api_annotation(annotation_id: int, who: Reader, worklist: WorklistDep) -> dict[str, Any]:
    return worklist.item(annotation_id)


@router.post("/{annotation_id}/claim")
def api_claim(annotation_id: int, who: Corrector, worklist: WorklistDep) -> dict[str, Any]:
    """Hold the case for `review.lease_minutes`; claiming again renews the lease."""
    return worklist.claim(annotation_id, who.name)


@router.post("/{annotation_id}/release")
def api_release(annotation_id: int, who: Corrector, worklist: WorklistDep) -> dict[str, Any]:
    return worklist.release(annotation_id, who.name, force=who.may(VALIDATE))


@router.post("/{annotation_id}/accept")
def api_accept(annotation_id: int, who: Corrector, worklist: WorklistDep) -> dict[str, Any]:
    """The claimed draft needs no change: it becomes the correction (Dice 1)."""
    return worklist.accept_draft(annotation_id, who.name)


@router.post("/{annotation_id}/accept-refined")
def api_accept_refined(
    annotation_id: int, who: Corrector, assistant: AssistantDep
) -> dict[str, Any]:
    """The caller's latest click-guided refinement of the claimed case becomes its correction
    (OHIF's MONAI Label panel refines but cannot save)."""
    return assistant.accept_refined(annotation_id, who.name)


@router.put("/{annotation_id}/label")
async def api_label(
    annotation_id: int, request: Request, who: Corrector, worklist: WorklistDep
) -> dict[str, Any]:
    """Upload the correction of a claimed case as a DICOM SEG, or as a NIfTI or NRRD label map
    (`.nii`/`.nii.gz`/`.nrrd` on the draft series' grid, values = the spec's label numbers; a
    `.seg.nrrd`'s segments are matched to the spec's labels by name)."""
    data = await request.body()
    if is_dicom(data):
        return await run_in_threadpool(worklist.correct_with_seg, annotation_id, who.name, data)
    if is_label_volume(data):
        return await run_in_threadpool(worklist.correct_with_volume, annotation_id, who.name, data)
    raise HTTPException(415, "the body is neither a DICOM SEG (Part 10) nor a NIfTI or NRRD file")


@router.post("/{annotation_id}/validate")
def api_validate(annotation_id: int, who: Reviewer, worklist: WorklistDep) -> dict[str, Any]:
    """Accept the correction as a training label (train or frozen holdout)."""
    return worklist.validate(annotation_id, who.name)


@router.put("/{annotation_id}/urgent")
def api_urgent(
    annotation_id: int, body: UrgentBody, who: Reviewer, worklist: WorklistDep
) -> dict[str, Any]:
    return worklist.set_urgent(annotation_id, body.urgent, who.name)
