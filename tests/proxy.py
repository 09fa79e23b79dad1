"""An HTTP proxy that cuts an exchange at its worst moment: the server behind it has done the
work and answered, and the caller never hears the answer — because, at that instant, the
server or the caller is killed (the test's `then`). A kill -9 timed by sleeping lands anywhere;
this one lands where a lost answer matters. With `before`, the cut comes the instant the caller
sends the chosen request, which the server then never gets: the caller dies between two steps.

Between a cut and `heal()` the proxy drops every request unanswered, as a dead server does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

# Not relayed: they describe one hop (httpx has already undone any encoding it names).
HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}
NOT_SENT = HOP | {"host"}  # httpx names the upstream

Match = Callable[[str, str, int], bool]  # (method, path, upstream status; 0 before) → cut


class CuttingProxy:
    def __init__(
        self, upstream: str, when: Match, then: Callable[[], object], *, before: bool = False
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.when = when
        self.then = then
        self.before = before
        self.cut = threading.Event()  # set once cut (and `then` done) until `heal()`
        self.cuts = 0
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=120)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> CuttingProxy:
        self._thread.start()
        return self

    def heal(self) -> None:
        """Relay again (the test has started the killed server again), and cut nothing more."""
        self.when = lambda method, path, status: False
        self.cut.clear()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def _relay(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> httpx.Response | None:
        if self.cut.is_set() or (self.before and self._cuts(method, path, 0)):
            return None
        try:
            answer = self._client.request(
                method, self.upstream + path, headers=headers, content=body
            )
        except httpx.HTTPError:
            return None  # the server is down: so is its proxy, for this caller
        if not self.before and self._cuts(method, path, answer.status_code):
            return None
        return answer

    def _cuts(self, method: str, path: str, status: int) -> bool:
        """Whether this exchange is cut (then, or earlier): `then` has run when it is."""
        with self._lock:
            if self.cut.is_set():
                return True
            if not self.when(method, path, status):
                return False
            self.cuts += 1
            self.then()
            self.cut.set()  # after `then`: a test waiting for it finds the kill done
            return True

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def relay(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in NOT_SENT}
                answer = proxy._relay(self.command, self.path, headers, body)
                if answer is None:  # no answer at all: the caller sees the connection drop
                    self.close_connection = True
                    return
                self.send_response(answer.status_code)
                for key, value in answer.headers.multi_items():
                    if key.lower() not in HOP:
                        self.send_header(key, value)
                self.send_header("content-length", str(len(answer.content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer.content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = relay

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler
