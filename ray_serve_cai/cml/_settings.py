"""Connection settings: where the workspace is, the API key, TLS and time limits."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from ._errors import CMLSettingsError

__all__ = ["CMLSettings", "is_loopback_name", "normalize_host"]


def is_loopback_name(hostname: str) -> bool:
    """True for ``localhost``, names under ``.localhost`` (RFC 6761) and 127.0.0.1."""
    name = hostname.lower().rstrip(".")
    return name in ("localhost", "127.0.0.1", "::1", "[::1]") or name.endswith(".localhost")


def normalize_host(value: str) -> str:
    """``scheme://host[:port]`` from a URL or a bare host; drops a trailing ``/`` or ``/api/v2``.

    A bare host gets ``https://`` — except loopback names (the local workspace), which get ``http://``:
    no CML workspace serves TLS on loopback.
    """
    text = value.strip()
    if not text:
        raise ValueError("the CML host is empty")
    if "://" not in text:
        hostname = urlsplit(f"//{text}").hostname or ""
        text = ("http://" if is_loopback_name(hostname) else "https://") + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the CML host must look like https://ml.example.cloudera.site, got {value!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("the CML host must be scheme://host[:port] without credentials, query or fragment")
    path = parts.path.rstrip("/")
    for suffix in ("/api/v2", "/api/v1"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    return f"{parts.scheme}://{parts.netloc.lower()}{path.rstrip('/')}"


class CMLSettings(BaseModel):
    """How to reach one CML workspace.

    ``host`` is the workspace base URL (``https://ml.example.cloudera.site``); ``verify`` is True, False
    or a CA bundle path; ``timeout`` bounds each request, ``retry_deadline`` all retries of one call.
    The API key is a :class:`~pydantic.SecretStr`: ``repr()`` and ``str()`` show ``**********``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str
    api_key: SecretStr
    project_id: str | None = None
    verify: bool | str = True
    timeout: float = Field(default=30.0, gt=0)
    retry_deadline: float = Field(default=60.0, ge=0)

    @field_validator("host")
    @classmethod
    def _normalize_host(cls, value: str) -> str:
        return normalize_host(value)

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value().strip()
        if not secret:
            raise ValueError("the API key is empty")
        return SecretStr(secret)

    @field_validator("project_id")
    @classmethod
    def _blank_project_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @property
    def api_url(self) -> str:
        """The API v2 base URL, ``<host>/api/v2``."""
        return f"{self.host}/api/v2"

    @property
    def scheme(self) -> str:
        """``https`` or ``http`` (the local workspace)."""
        return urlsplit(self.host).scheme

    @property
    def domain(self) -> str:
        """``host[:port]`` of the workspace: what ``CDSW_DOMAIN`` holds inside a workload."""
        return urlsplit(self.host).netloc

    @classmethod
    def create(cls, **values: Any) -> CMLSettings:
        """Like the constructor, but a bad value raises :class:`CMLSettingsError` (one line, no key)."""
        try:
            return cls(**values)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {_short(e['msg'])}"
                for e in err.errors()
            )
            raise CMLSettingsError(f"invalid CML settings: {problems}") from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> CMLSettings:
        """Settings from the environment.

        ``CML_HOST`` / ``CML_API_KEY`` / ``CML_PROJECT_ID``; inside a CML workload ``https://$CDSW_DOMAIN``,
        ``CDSW_APIV2_KEY`` and ``CDSW_PROJECT_ID`` fill what is missing — the workload's own key and
        project are only used for the workload's own workspace, never sent to another ``CML_HOST``.
        TLS: ``CML_CA_BUNDLE`` or ``REQUESTS_CA_BUNDLE`` (a CA bundle path). Keyword ``overrides`` win.
        """
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        cdsw_domain = get("CDSW_DOMAIN")
        values: dict[str, Any] = {}
        host = overrides.get("host") or get("CML_HOST") or cdsw_domain
        if not host:
            raise CMLSettingsError(
                "no CML workspace configured: set CML_HOST to the workspace URL "
                "(e.g. https://ml.example.cloudera.site)"
            )
        try:
            host = normalize_host(host)  # a bare CDSW_DOMAIN gets https (http on loopback: local workspace)
        except ValueError as err:
            raise CMLSettingsError(f"invalid CML_HOST: {err}") from None
        own_workspace = cdsw_domain is not None and urlsplit(host).netloc == cdsw_domain.lower()

        key = get("CML_API_KEY") or (get("CDSW_APIV2_KEY") if own_workspace else None)
        if "api_key" not in overrides and not key:
            raise CMLSettingsError(
                "no CML API key configured: set CML_API_KEY to an API v2 key "
                "(User Settings > API Keys in the workspace)"
            )
        values["host"] = host
        values["api_key"] = key
        project_id = get("CML_PROJECT_ID") or (get("CDSW_PROJECT_ID") if own_workspace else None)
        if project_id:
            values["project_id"] = project_id
        bundle = get("CML_CA_BUNDLE") or get("REQUESTS_CA_BUNDLE")
        if bundle:
            values["verify"] = bundle
        values.update(overrides)
        return cls.create(**values)


def _short(message: str) -> str:
    return message.removeprefix("Value error, ")
