"""An httpx transport that connects ``*.localhost`` names to 127.0.0.1, keeping the ``Host`` header.

RFC 6761 reserves ``.localhost`` for loopback, but not every resolver maps ``app.localhost`` there. The
local workspace routes an application's requests by ``Host`` (``<subdomain>.localhost:<port>``), so
we dial 127.0.0.1 ourselves and leave the header (and the TLS server name) as the URL said.
"""

from __future__ import annotations

import httpx

__all__ = ["LoopbackTransport"]


class LoopbackTransport(httpx.BaseTransport):
    """Wraps another transport; requests to ``localhost`` or ``*.localhost`` go to 127.0.0.1."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host.lower().rstrip(".")
        if host == "localhost" or host.endswith(".localhost"):
            # httpx set ``Host`` from the original URL when the request was built; it stays.
            request.extensions = {**request.extensions, "sni_hostname": host}
            request.url = request.url.copy_with(host="127.0.0.1")
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()
