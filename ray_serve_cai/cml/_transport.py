"""How application URLs are reached: the ``url`` a workspace gives, and loopback names dialled directly.

CML's API v2 has no URL field for an application (it lives at ``https://<subdomain>.<CDSW_DOMAIN>``);
the local workspace adds ``url`` (``http://127.0.0.1:<port>``, one loopback listener per application).
``localhost`` is dialled at 127.0.0.1 (no IPv6 attempt, never an environment proxy), keeping the
``Host`` header and the TLS server name as the URL said.
"""

from __future__ import annotations

import functools
import os
import ssl
from typing import Any

import httpx

from ._errors import CMLSettingsError

__all__ = ["LoopbackTransport", "application_url", "http_client", "ssl_context"]

# Loopback names (the local workspace) are dialled directly, never through an environment proxy.
LOOPBACK_PATTERNS = ("all://localhost", "all://127.0.0.1")


@functools.cache
def ssl_context(verify: bool | str) -> ssl.SSLContext:
    """The one TLS context of every HTTPS client of the package (the API, application URLs,
    WebSockets), made once per process and setting — loading a CA bundle costs tens of milliseconds,
    and a command opens several clients: httpx's default trust (certifi) for True, no verification
    for False, else a CA bundle file or directory."""
    if isinstance(verify, bool):
        return httpx.create_ssl_context(verify=verify)
    _require_bundle(verify)
    if os.path.isdir(verify):
        return ssl.create_default_context(capath=verify)
    return ssl.create_default_context(cafile=verify)


def _require_bundle(verify: bool | str) -> None:
    """A CA bundle that is set must exist, whether or not this client ever uses it."""
    if isinstance(verify, str) and not (os.path.isdir(verify) or os.path.isfile(verify)):
        raise CMLSettingsError(f"CA bundle {verify!r} does not exist; fix CML_CA_BUNDLE / REQUESTS_CA_BUNDLE")


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


@functools.cache
def _no_tls_expected() -> ssl.SSLContext:
    """The TLS context of a client whose base URL is plain ``http://`` (the local workspace): it has
    nothing to verify, so no CA bundle is loaded for it; verification stays on with nothing trusted,
    so an ``https://`` URL sent through such a client fails instead of going unverified."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def http_client(
    base_url: str,
    *,
    api_key: str,
    verify: bool | str,
    timeout: httpx.Timeout,
    user_agent: str,
    transport: httpx.BaseTransport | None = None,
) -> httpx.Client:
    """The one way the package opens HTTP to CML: its API and every application URL (requests,
    streams). `Authorization: Bearer <key>`, the TLS setting of `ssl_context` (none for a plain
    ``http://`` base URL, which never needs one), loopback dialled directly (no environment proxy;
    `localhost` at 127.0.0.1), everything else through httpx's default transport, which honours
    HTTP(S)_PROXY. A `transport` passed in (tests) is used for all."""
    if base_url.lower().startswith("http://"):
        _require_bundle(verify)
        context = _no_tls_expected()
    else:
        context = ssl_context(verify)
    loopback = LoopbackTransport(transport or httpx.HTTPTransport(verify=context))
    return httpx.Client(
        base_url=base_url,
        headers={"Authorization": f"Bearer {api_key}", "User-Agent": user_agent},
        timeout=timeout,
        verify=context,
        transport=loopback if transport is not None else None,
        mounts={pattern: loopback for pattern in LOOPBACK_PATTERNS},
        follow_redirects=False,
    )
