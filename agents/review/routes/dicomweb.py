"""`/dicom-web`: the authenticated DICOMweb proxy to Orthanc (`agents.review.proxy`).
Reading needs any role; storing (STOW-RS, which may carry corrections) a role that corrects."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from agents.review.deps import Corrector, ProxyDep, Reader

router = APIRouter(prefix="/dicom-web", tags=["dicomweb"])


@router.post("/studies")
@router.post("/studies/{study_uid}")
async def stow(request: Request, who: Corrector, proxy: ProxyDep) -> Response:
    """STOW-RS: SEGs on radloop's drafts become corrections; all goes to Orthanc."""
    return await proxy.stow(request, who)


@router.get("/{path:path}")
async def read(path: str, request: Request, who: Reader, proxy: ProxyDep) -> Response:
    """QIDO-RS and WADO-RS, streamed from Orthanc."""
    return await proxy.read(path, request, who)
