"""`ray-cai doctor`'s probe application (stdlib only: it runs on any runtime, uploaded by the doctor).

Serves on 127.0.0.1:$CDSW_APP_PORT: `/env` (what the pod was given), `/manage` (whether the API key in
its environment can manage applications: list them, then update its own description), `/ws` (a
WebSocket echo, to see upgrades pass the application URL). Listens on Ray's ports on
$CDSW_IP_ADDRESS for the probe job (pod-to-pod TCP), holds an flock on `.ray-cai-doctor/lock` and keeps
rewriting `.ray-cai-doctor/rename.json` by temp file + rename (the job checks both across pods).
Writes `.ray-cai-doctor/app.json` (its IP and ports) once everything is up.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import socket
import struct
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STATE = Path(".ray-cai-doctor")
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
USER_AGENT = "ray-serve-cai-doctor-probe/1"


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def listen_on_ray_ports(ip: str, wanted: list[int]) -> dict[str, int]:
    """A listener per wanted port on the pod IP (a taken port, as on a shared host, gets a free one)."""
    found: dict[str, int] = {}
    for port in wanted:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, port))
        except OSError:
            sock.bind((ip, 0))
        sock.listen(16)
        found[str(port)] = sock.getsockname()[1]
        threading.Thread(target=answer_banner, args=(sock,), daemon=True).start()
    return found


def answer_banner(sock: socket.socket) -> None:
    while True:
        connection, _ = sock.accept()
        with contextlib.suppress(OSError), connection:
            connection.sendall(b"ray-cai-doctor\n")


def keep_renaming(path: Path) -> None:
    """Rewrite `path` by temp file + rename, a counter and 64 KiB of padding each time."""
    counter = 0
    padding = "x" * 65536
    while True:
        counter += 1
        write_atomically(path, json.dumps({"counter": counter, "padding": padding}))
        time.sleep(0.005)


def api_base() -> str:
    v1 = os.environ.get("CDSW_API_URL", "")
    if v1.endswith("/api/v1"):
        return v1[: -len("/api/v1")] + "/api/v2"
    return f"https://{os.environ.get('CDSW_DOMAIN', '')}/api/v2"


def api(method: str, path: str, body: dict[str, object] | None = None) -> tuple[int, object]:
    request = urllib.request.Request(
        api_base() + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={
            "Authorization": f"Bearer {os.environ.get('CDSW_APIV2_KEY', '')}",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, {}
    except OSError as error:
        return 0, {"error": type(error).__name__}


def manage_check() -> dict[str, object]:
    """List the project's applications with the pod's key, then update this app's description."""
    if not os.environ.get("CDSW_APIV2_KEY"):
        return {"key": False}
    project = urllib.parse.quote(os.environ.get("CDSW_PROJECT_ID", ""), safe="")
    subdomain = os.environ.get("RAY_CAI_DOCTOR_SUBDOMAIN", "")
    query = urllib.parse.urlencode({"search_filter": json.dumps({"subdomain": subdomain}), "page_size": 100})
    listed, page = api("GET", f"/projects/{project}/applications?{query}")
    apps = page.get("applications", []) if isinstance(page, dict) else []
    mine = next((a for a in apps if a.get("subdomain") == subdomain), None)
    if mine is None:
        return {"key": True, "list": listed, "update": None}
    path = f"/projects/{project}/applications/{urllib.parse.quote(mine['id'], safe='')}"
    updated, _ = api("PATCH", path, {"description": "ray-cai doctor probe (its key updated this)"})
    return {"key": True, "list": listed, "update": updated}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # a WebSocket handshake answer must be HTTP/1.1

    def do_GET(self) -> None:
        if self.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            self.echo_websocket()
            return
        if self.path == "/env":
            self.reply(
                {
                    "app_port": os.environ.get("CDSW_APP_PORT"),
                    "ip_address": os.environ.get("CDSW_IP_ADDRESS"),
                    "has_api_key": bool(os.environ.get("CDSW_APIV2_KEY")),
                    "project_id": os.environ.get("CDSW_PROJECT_ID"),
                }
            )
        elif self.path == "/manage":
            self.reply(manage_check())
        else:
            self.reply({"probe": "ray-cai doctor"})

    def reply(self, data: object) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def echo_websocket(self) -> None:
        """The server side of RFC 6455, enough to echo one text message back."""
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        first, second = self.rfile.read(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack(">H", self.rfile.read(2))
        elif length == 127:
            (length,) = struct.unpack(">Q", self.rfile.read(8))
        mask = self.rfile.read(4) if second & 0x80 else b"\0\0\0\0"
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
        header = (
            bytes([0x81, len(payload)])
            if len(payload) < 126
            else bytes([0x81, 126]) + struct.pack(">H", len(payload))
        )
        self.wfile.write(header + payload)
        self.wfile.write(bytes([0x88, 2]) + struct.pack(">H", 1000))  # close: normal
        self.wfile.flush()
        self.close_connection = True
        del first

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    STATE.mkdir(exist_ok=True)
    ip = os.environ.get("CDSW_IP_ADDRESS") or "127.0.0.1"
    wanted = [int(p) for p in os.environ.get("RAY_CAI_DOCTOR_PORTS", "6379,8265,10001,20000").split(",")]
    ports = listen_on_ray_ports(ip, wanted)
    lock = open(STATE / "lock", "a")  # noqa: SIM115 (held for the app's whole life)
    fcntl.flock(lock, fcntl.LOCK_EX)
    threading.Thread(target=keep_renaming, args=(STATE / "rename.json",), daemon=True).start()
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["CDSW_APP_PORT"])), Handler)
    write_atomically(STATE / "app.json", json.dumps({"ip": ip, "ports": ports, "pid": os.getpid()}))
    server.serve_forever()


if __name__ == "__main__":
    main()
