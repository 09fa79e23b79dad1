"""The OHIF viewer at the service root: its generated `app-config.js`, its files, and — for any
other path, one of its client-side routes — its `index.html`, which needs a login (its assets
do not). Included last: `/{path:path}` answers every GET no other route took."""

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, Response

from agents.review.auth import READ
from agents.review.deps import OhifDep, UsersDep, page_principal
from agents.review.headers import VIEWER_FILE

router = APIRouter(include_in_schema=False)


@router.get("/app-config.js")
def app_config(ohif: OhifDep) -> Response:
    return Response(
        ohif.app_config(),
        media_type="application/javascript",
        headers={"cache-control": "no-store"},
    )


@router.get("/{path:path}")
async def static(path: str, request: Request, ohif: OhifDep, users: UsersDep) -> Response:
    """The viewer's files; any other path is one of its client-side routes."""
    found = ohif.file(path)
    if found is not None:
        return FileResponse(found, headers=VIEWER_FILE)
    if path.startswith(("api/", "dicom-web/", "monailabel/", "proxy/")) or "." in Path(path).name:
        raise HTTPException(404, f"no such file: /{path}")
    await page_principal(request, users, READ)
    return FileResponse(ohif.index, headers={**VIEWER_FILE, "cache-control": "no-store"})
