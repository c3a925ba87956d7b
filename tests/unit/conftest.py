"""The unit tier: pure code, no processes, no sockets.

Every test here runs with process creation and socket use turned into a failure (`pytest.fail` naming
what was attempted), so a test that needs a server or a subprocess is caught the moment it is written
and belongs in `tests/workspace/` (or `tests/ray/` with real Ray).
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

# urllib3 (imported by Ray and requests) probes IPv6 with a socket bind when first imported: imported
# here, before any test, so that import-time probe is not taken for a test's own socket use.
import urllib3  # noqa: F401


def _refuse(what: str) -> Any:
    def refused(*_args: Any, **_kwargs: Any) -> Any:
        pytest.fail(f"unit tests use no {what}: move this test to tests/workspace or tests/ray", pytrace=True)

    return refused


@pytest.fixture(autouse=True)
def _no_processes_no_sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("connect", "connect_ex", "bind", "listen", "sendto"):
        monkeypatch.setattr(socket.socket, name, _refuse(f"sockets (socket.{name})"))
    monkeypatch.setattr(socket, "create_connection", _refuse("sockets (socket.create_connection)"))
    monkeypatch.setattr(socket, "getaddrinfo", _refuse("network lookups (socket.getaddrinfo)"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("processes (subprocess.Popen)"))
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "execv", "execve"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, _refuse(f"processes (os.{name})"))
    yield
