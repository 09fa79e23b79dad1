"""Security headers on every answer of the review service (OWASP ASVS 4.0 V14.4, V8.2.1).

radloop's own pages run no script and are never framed: their policy allows scripts from
nowhere but the service and inline styles only (the pages' one style block). The OHIF viewers
ship an inline script, compile their image codecs from WebAssembly and start workers from blob
URLs, so their files carry `VIEWER` instead: it still lets them talk to this service only, and
never be framed. FastAPI's `/docs` loads Swagger UI from its CDN. Dynamic answers are not
cached (`no-store`: they carry images and labels); the viewers' files may be, revalidated.

A small ASGI middleware rather than a dependency: five headers do not need one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

PAGES = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
VIEWER = (
    "default-src 'self'; "
    "script-src 'self' 'unsafe-inline' 'unsafe-eval' 'wasm-unsafe-eval' blob:; "
    "worker-src 'self' blob:; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "font-src 'self' data:; connect-src 'self' data: blob:; media-src 'self' data: blob:; "
    "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
_DOCS = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "img-src 'self' data: https://fastapi.tiangolo.com; object-src 'none'; "
    "frame-ancestors 'none'"
)
# What a viewer file's response sets itself (the middleware adds what it leaves out).
VIEWER_FILE = {"content-security-policy": VIEWER, "cache-control": "no-cache"}


class SecurityHeaders:
    """Adds the headers an answer did not set itself; HSTS when the service speaks HTTPS."""

    def __init__(self, app: App, *, https: bool) -> None:
        self.app = app
        self.https = https

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        docs = scope["path"] in ("/docs", "/redoc", "/docs/oauth2-redirect")
        defaults = {
            b"content-security-policy": (_DOCS if docs else PAGES).encode(),
            b"x-content-type-options": b"nosniff",
            b"x-frame-options": b"DENY",
            b"referrer-policy": b"same-origin",
            b"cache-control": b"no-store",
        }
        if self.https:
            defaults[b"strict-transport-security"] = b"max-age=31536000"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(k, v) for k, v in defaults.items() if k not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
