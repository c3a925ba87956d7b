"""How application URLs are reached: the ``url`` a workspace gives, and loopback names dialled directly.

CML's API v2 has no URL field for an application (it lives at ``https://<subdomain>.<CDSW_DOMAIN>``);
the local workspace adds ``url`` (``http://127.0.0.1:<port>``, one loopback listener per application).
``localhost`` is dialled at 127.0.0.1 (no IPv6 attempt, never an environment proxy), keeping the
``Host`` header and the TLS server name as the URL said.
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["LoopbackTransport", "application_url"]


def application_url(app: Any) -> str | None:
    """The ``url`` an application object carries (a local-workspace extension), without a trailing
    ``/``; None on CML, where the object has none."""
    extra = getattr(app, "model_extra", None) or {}
    url = extra.get("url")
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        return url.rstrip("/")
    return None


class LoopbackTransport(httpx.BaseTransport):
    """Wraps another transport; requests to ``localhost`` go to 127.0.0.1."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host.lower().rstrip(".") == "localhost":
            # httpx set ``Host`` from the original URL when the request was built; it stays.
            request.extensions = {**request.extensions, "sni_hostname": "localhost"}
            request.url = request.url.copy_with(host="127.0.0.1")
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()
