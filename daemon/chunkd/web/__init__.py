"""``chunkd web``: the dashboard and the progress API, an ASGI app (Starlette) that reads the
queue through the public SQL contract only.

- :mod:`~chunkd.web.settings`: what the command was given, validated (bind address, token);
- :mod:`~chunkd.web.security`: the operator token, sessions, CSRF, the Host check, headers;
- :mod:`~chunkd.web.data`: the reads, one function per page, on named statements of
  ``sql/web.sql``;
- :mod:`~chunkd.web.present`: numbers and payloads as a page shows them (redacted, truncated);
- :mod:`~chunkd.web.actions`: retry and cancel, behind a confirmation;
- :mod:`~chunkd.web.pages`, :mod:`~chunkd.web.api`: the HTML routes and the JSON/SSE API;
- :mod:`~chunkd.web.app`: the app factory.

Templates and static files are package data (``chunkd/web/templates``, ``chunkd/web/static``).
"""

from chunkd.web.app import create_app
from chunkd.web.settings import WebSettings

__all__ = ["WebSettings", "create_app"]
