"""A small HTTP proxy in front of the moto S3 server that injects the failures real object storage has:
throttling and server errors on some writes, dropped connections, and credentials it does not accept."""

from __future__ import annotations

import http.client
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_ERROR = """<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>{code}</Code><Message>{message}</Message><RequestId>proxy</RequestId></Error>"""
_ACCESS_KEY = re.compile(r"Credential=([^/]+)/")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultyS3Proxy:
    """Forwards every request to ``upstream``; ``url`` is the endpoint to give clients.

    - ``fail_every_nth_write``: every n-th PUT/POST answers 503 SlowDown (or 500 InternalError, alternating)
      without reaching the server; the client's retry is a new request, so each failure is transient.
    - ``drop_every_nth_write``: every n-th PUT/POST has its connection closed without an answer.
    - ``access_key``: requests signed with another access key id answer 403 InvalidAccessKeyId.
    """

    def __init__(self, upstream: str, *, fail_every_nth_write: int = 0, drop_every_nth_write: int = 0,
                 access_key: str | None = None):
        self.upstream = urlsplit(upstream)
        self.fail_every = fail_every_nth_write
        self.drop_every = drop_every_nth_write
        self.access_key = access_key
        self.writes = 0
        self.injected: list[str] = []  # what was done to which request, for the tests to check
        self.copies: list[str] = []  # server-side copies (how S3 clients "rename"), passed on but recorded
        self.object_reads: list[str] = []  # paths of object GETs (not listings), passed on but recorded
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultyS3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fault_for(self, method: str, path: str, headers) -> str | None:
        if self.access_key is not None:
            found = _ACCESS_KEY.search(headers.get("Authorization", ""))
            if not found or found.group(1) != self.access_key:
                return "deny"
        if method == "GET" and not urlsplit(path).query:
            with self._lock:
                self.object_reads.append(urlsplit(path).path)
        if method not in ("PUT", "POST"):
            return None
        with self._lock:
            if "x-amz-copy-source" in {k.lower() for k in headers}:
                self.copies.append(path)
            self.writes += 1
            n = self.writes
            fault = None
            if self.drop_every and n % self.drop_every == 0:
                fault = "drop"
            elif self.fail_every and n % self.fail_every == 0:
                fault = "503" if (n // self.fail_every) % 2 else "500"
            if fault:
                self.injected.append(f"{fault} {method} {path}")
        return fault

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._fault_for(self.command, self.path, self.headers)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "deny":
                    return self._error(403, "InvalidAccessKeyId",
                                       "The AWS Access Key Id you provided does not exist in our records.")
                if fault == "503":
                    return self._error(503, "SlowDown", "Please reduce your request rate.")
                if fault == "500":
                    return self._error(500, "InternalError", "We encountered an internal error. Please try again.")
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                finally:
                    conn.close()
                self.send_response(response.status)
                for k, v in response.getheaders():
                    # A HEAD answer's length is the object's: pass it on as it is.
                    if k.lower() not in _HOP_BY_HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _error(self, status: int, code: str, message: str) -> None:
                data = _ERROR.format(code=code, message=message).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
