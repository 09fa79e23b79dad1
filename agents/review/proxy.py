"""The authenticated DICOMweb proxy to Orthanc, and the OHIF viewer served beside it.

Reads (QIDO-RS, WADO-RS) stream through unchanged. A STOW-RS — what OHIF's "save" sends — is
read first: each SEG in it that labels a series radloop drafted becomes that draft's correction
(checked against the draft; a bad one is refused with 4xx and nothing is forwarded), then the
whole request goes on to Orthanc, so the correction is in the PACS like any other SEG.
Their routes, which authenticate the caller first, are `agents.review.routes.dicomweb` and
`agents.review.routes.viewer`.
"""

import email.message
import email.parser
import email.policy
import json
import logging
from collections.abc import AsyncIterator
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from agents.review.auth import Principal
from agents.review.corrections import SEGMENTATION_CLASSES
from agents.review.worklist import ReviewError, Worklist
from radloop.settings import OrthancSettings

log = logging.getLogger(__name__)

# Hop-by-hop headers are each connection's own; credentials and length of the request to the
# proxy are not Orthanc's business.
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection"}
_DROP_REQUEST = _HOP | {"host", "authorization", "cookie", "content-length"}
# What a viewer reads over DICOMweb (QIDO-RS and WADO-RS, bulk data included).
_RESOURCES = {"studies", "series", "instances"}


def _resource(path: str) -> str:
    """`path` as a relative URL under Orthanc's DICOMweb root, or 404: only DICOMweb resources,
    no `..` (an encoded `%2E%2E` arrives decoded and would reach Orthanc's whole REST API, with
    every patient's name), no control characters; the rest percent-encoded again."""
    parts = path.split("/")
    if parts[0] not in _RESOURCES or {".", ".."} & set(parts) or not path.isprintable():
        raise HTTPException(404, "not a DICOMweb resource (studies, series or instances)")
    return quote(path, safe="/,")


def split_multipart_related(body: bytes, content_type: str) -> list[bytes]:
    """The payloads of a multipart/related body (DICOM PS3.18 STOW-RS request)."""
    header = email.message.Message()
    header["content-type"] = content_type
    if header.get_content_type() != "multipart/related" or not header.get_param("boundary"):
        raise ValueError("a STOW-RS request is multipart/related with a boundary")
    parser = email.parser.BytesParser(policy=email.policy.HTTP)
    message = parser.parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    parts = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            parts.append(payload)
    if not parts:
        raise ValueError("the multipart/related body holds no parts")
    return parts


class DicomWebProxy:
    def __init__(self, orthanc: OrthancSettings, worklist: Worklist) -> None:
        password = orthanc.password.get_secret_value() if orthanc.password else ""
        auth = (orthanc.username, password) if orthanc.username else None
        self.client = httpx.AsyncClient(
            base_url=orthanc.base_url.rstrip("/") + "/dicom-web/",
            auth=auth,
            timeout=httpx.Timeout(120.0, connect=5.0),
        )
        self.worklist = worklist

    async def close(self) -> None:
        await self.client.aclose()

    async def stow(self, request: Request, who: Principal) -> Response:
        """STOW-RS: SEGs on radloop's drafts become corrections; all goes to Orthanc."""
        study = request.path_params.get("study_uid")
        target = _resource("studies" + (f"/{study}" if study else ""))
        body = await request.body()
        content_type = request.headers.get("content-type", "")
        try:
            parts = split_multipart_related(body, content_type)
        except ValueError as error:
            raise HTTPException(415, str(error)) from None
        recorded = []
        for part in parts:
            annotation_id = await run_in_threadpool(self._correction_target, part, who.name)
            if annotation_id is None:
                continue
            try:
                await run_in_threadpool(
                    self.worklist.correct_with_seg, annotation_id, who.name, part
                )
            except ReviewError as refused:
                log.info("STOW from %s refused: %s", who.name, refused)
                raise HTTPException(refused.status, str(refused)) from None
            recorded.append(annotation_id)
        try:
            answer = await self.client.post(target, content=body, headers=self._headers(request))
        except httpx.HTTPError as error:
            detail = f"Orthanc did not take the instances: {error}"
            if recorded:
                detail += f" (corrections of {recorded} are recorded; saving again is safe)"
            raise HTTPException(502, detail) from None
        if recorded:
            log.info("%s saved corrections of annotations %s", who.name, recorded)
        return Response(
            answer.content,
            status_code=answer.status_code,
            media_type=answer.headers.get("content-type"),
        )

    async def read(self, path: str, request: Request, who: Principal) -> Response:
        """QIDO-RS and WADO-RS, streamed from Orthanc; a read of a study's instances is a view
        in the audit log."""
        outgoing = self.client.build_request(
            "GET", _resource(path), params=request.query_params, headers=self._headers(request)
        )
        try:
            answer = await self.client.send(outgoing, stream=True)
        except httpx.HTTPError as error:
            raise HTTPException(502, f"Orthanc is not answering: {error}") from None
        parts = path.split("/")
        if answer.status_code < 400 and len(parts) > 2 and parts[0] == "studies":
            await run_in_threadpool(self.worklist.audit.viewed, who.name, parts[1])
        # The body goes through as Orthanc encoded it (gzip, if the viewer accepts it).
        headers = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP}

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in answer.aiter_raw():
                    yield chunk
            finally:
                await answer.aclose()

        return StreamingResponse(body(), status_code=answer.status_code, headers=headers)

    def _correction_target(self, part: bytes, user: str) -> int | None:
        """The annotation a STOW part corrects: a SEG on a series radloop drafted."""
        try:
            ds = dcmread(BytesIO(part), stop_before_pixels=True)
        except (InvalidDicomError, EOFError, ValueError):
            raise HTTPException(400, "a STOW part is not a DICOM Part 10 instance") from None
        if ds.get("SOPClassUID") not in SEGMENTATION_CLASSES:
            return None
        series = {str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", [])}
        return self.worklist.open_case_for_study(str(ds.get("StudyInstanceUID", "")), series, user)

    @staticmethod
    def _headers(request: Request) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        # Orthanc's DICOMweb plugin builds the URLs in its answers (BulkDataURI, RetrieveURL)
        # from this header: they then point back at this proxy, not at Orthanc.
        headers["forwarded"] = f"host={request.url.netloc};proto={request.url.scheme}"
        return headers


class OhifHost:
    """A prebuilt OHIF dist under `base` (its router basename), with radloop's generated
    `app-config.js`: DICOMweb at `qido`/`wado` on the service itself, which authenticate."""

    def __init__(
        self,
        dist: Path,
        base: str = "/",
        qido: str = "/dicom-web",
        wado: str = "/dicom-web",
        **extra: Any,
    ) -> None:
        self.dist = dist.resolve()
        self.index = self.dist / "index.html"
        self.base = base
        self.roots = {"qidoRoot": qido, "wadoRoot": wado, "wadoUriRoot": wado}
        self.extra = extra

    @property
    def installed(self) -> bool:
        return self.index.is_file()

    def app_config(self) -> str:
        source = {
            "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
            "sourceName": "radloop",
            "configuration": {
                "friendlyName": "radloop (Orthanc through the review service)",
                "name": "radloop",
                "qidoSupportsIncludeField": False,
                "imageRendering": "wadors",
                "thumbnailRendering": "wadors",
                "enableStudyLazyLoad": True,
                "supportsFuzzyMatching": False,
                "supportsWildcard": True,
                "supportsReject": False,
                "dicomUploadEnabled": False,
                "staticWado": False,
                "singlepart": "bulkdata,video",
                "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
                "omitQuotationForMultipartRequest": True,
            },
        }
        config: dict[str, Any] = {
            "routerBasename": self.base,
            "extensions": [],
            "modes": [],
            "showStudyList": True,
            "maxNumberOfWebWorkers": 2,
            "showWarningMessageForCrossOrigin": False,
            "showCPUFallbackMessage": False,
            "showLoadingIndicator": True,
            "strictZSpacingForVolumeViewport": True,
            "defaultDataSourceName": "radloop",
            "dataSources": [source],
            **self.extra,
        }
        roots = "".join(
            f"radloopSource.configuration.{key} = window.location.origin + '{root}';\n"
            for key, root in self.roots.items()
        )
        return (
            "// Generated by radloop's review service: DICOMweb through its authenticated proxy.\n"
            f"window.config = {json.dumps(config, indent=2)};\n"
            "var radloopSource = window.config.dataSources[0];\n"
            f"{roots}"
        )

    def file(self, path: str) -> Path | None:
        """The viewer's file at `path`, or None when it has none there (a client-side route,
        or a path outside its dist). 503 when the viewer is not installed."""
        if not self.installed:
            raise HTTPException(
                503, f"the OHIF viewer is not installed at {self.dist}: run `make install`"
            )
        candidate = (self.dist / path).resolve()
        if path and candidate.is_file() and candidate.is_relative_to(self.dist):
            return candidate
        return None
