"""The base of the stand-in HTTP servers the handler and Supabase-guide tests start."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler
from typing import Any


class StubHandler(BaseHTTPRequestHandler):
    """Keep-alive (the pooled client reuses connections), quiet, and a one-call reply."""

    protocol_version = "HTTP/1.1"
    timeout = 10  # an idle keep-alive connection must not pin a server thread forever

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
