"""`/ohif/`: the OHIF build with MONAI Label's panel ("Open with AI tools"), and the
`/proxy/dicom/qido|wado` passthrough its build expects, to the same authenticated DICOMweb
proxy as `/dicom-web`.

The page needs a login. With it go two cookies the panel's own code reads: the MONAI Label
server it talks to (`MONAILABEL_SERVER_URL`, this service's `/monailabel/`, so the reader
connects without typing a URL) and `XSRF-TOKEN`, the session's CSRF token, which axios sends
back as `X-XSRF-TOKEN` on the panel's POSTs. The panel cannot save a label (MONAI Label issue
#1805): the worklist's "Accept refined label" saves the reader's latest refinement.
"""

from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, Response

from agents.review.auth import READ
from agents.review.deps import (
    XSRF_COOKIE,
    OhifAiDep,
    ProxyDep,
    Reader,
    ReviewSettingsDep,
    UsersDep,
    page_principal,
)
from agents.review.headers import VIEWER_FILE

router = APIRouter(include_in_schema=False)

BASE = "/ohif/"
QIDO = "/proxy/dicom/qido"
WADO = "/proxy/dicom/wado"
SERVER_COOKIE = "MONAILABEL_SERVER_URL"


@router.get("/ohif/app-config.js")
def app_config(ohif: OhifAiDep) -> Response:
    return Response(
        ohif.app_config(),
        media_type="application/javascript",
        headers={"cache-control": "no-store"},
    )


@router.get("/ohif")
@router.get("/ohif/{path:path}")
async def ohif_ai(
    request: Request,
    ohif: OhifAiDep,
    users: UsersDep,
    review: ReviewSettingsDep,
    path: str = "",
) -> Response:
    """The build's files; any other path is one of its client-side routes (the page)."""
    found = ohif.file(path)
    if found is not None:
        return FileResponse(found, headers=VIEWER_FILE)
    if "." in path.rsplit("/", 1)[-1]:
        raise HTTPException(404, f"no such file: {BASE}{path}")
    who = await page_principal(request, users, READ)
    page = FileResponse(ohif.index, headers={**VIEWER_FILE, "cache-control": "no-store"})
    server = (review.public_url or str(request.base_url)).rstrip("/") + "/monailabel/"
    # The panel unescape()s the cookie: escaped, the URL needs no quoting in the header.
    for name, value in ((SERVER_COOKIE, quote(server, safe="")), (XSRF_COOKIE, who.csrf_token)):
        page.set_cookie(
            name,
            value or "",
            max_age=int(review.session_hours * 3600),
            samesite="strict",
            secure=review.cookies_secure,
        )
    return page


@router.get("/proxy/dicom/qido/{path:path}")
@router.get("/proxy/dicom/wado/{path:path}")
async def passthrough(path: str, request: Request, who: Reader, proxy: ProxyDep) -> Response:
    """QIDO-RS and WADO-RS for the AI viewer, as `/dicom-web` answers them."""
    return await proxy.read(path, request, who)
