"""Test application: a stand-in for Ray's dashboard on a head that is failing over (Ray is not the point).

Serves on 127.0.0.1:$CDSW_APP_PORT the answers ray-cai reads from a head, as Ray 2.60 gives them:
- `GET /api/jobs/<submission id>`: the job (Ray's `JobDetails`), as the test set it (else 404);
  `POST /api/jobs/`: a submission, kept (its body) and answered with its id;
- `GET /ray-cai/status`: the head's status page (ray-cai's own), as the test set it;
- `GET /api/v0/actors?filter_values=<name>`: the actors of that name (Ray's state API list), one row
  per state the test set (none: an empty list);
- `GET /api/serve/applications/`: Serve's details; the test sets a list of answers given in turn (the
  last repeats), e.g. a controller that is back after two GETs; `PUT` is answered 200 and counted;
- `/`: 200 (the workspace's polling).
Test controls: `PUT /_standin` sets the scene (`{"jobs": {id: details}, "actors": {name: [states]},
"serve": [details, ...], "status": {...}}`) and resets the counts; `GET /_standin` returns the counts
(`"<METHOD> <path>"`: n), the bodies of Serve PUTs and of job submissions. Stdlib only.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

LOCK = threading.Lock()
SCENE: dict[str, Any] = {"jobs": {}, "actors": {}, "serve": [], "status": {}}
COUNTS: Counter[str] = Counter()
PUTS: list[Any] = []
SUBMITTED: list[Any] = []
SERVE_PATH = "/api/serve/applications/"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self) -> Any:
        length = int(self.headers.get("content-length") or 0)
        return json.loads(self.rfile.read(length) or b"null")

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        with LOCK:
            if url.path == "/_standin":
                return self.answer(200, {"counts": dict(COUNTS), "puts": PUTS, "submitted": SUBMITTED})
            COUNTS[f"GET {url.path}"] += 1
            if url.path == "/ray-cai/status":
                return self.answer(200, SCENE["status"])
            if url.path.startswith("/api/jobs/"):
                job = SCENE["jobs"].get(url.path.removeprefix("/api/jobs/").strip("/"))
                return (
                    self.answer(200, job) if job is not None else self.answer(404, {"error": "no such job"})
                )
            if url.path == "/api/v0/actors":
                name = parse_qs(url.query).get("filter_values", [""])[0]
                rows = [{"name": name, "state": state} for state in SCENE["actors"].get(name, [])]
                return self.answer(
                    200, {"result": True, "data": {"result": {"result": rows, "total": len(rows)}}}
                )
            if url.path == SERVE_PATH:
                answers = SCENE["serve"]
                turn = min(COUNTS[f"GET {SERVE_PATH}"], len(answers)) - 1
                return self.answer(200, answers[turn]) if answers else self.answer(503, {"error": "no Serve"})
        return self.answer(200, {"standin": True})

    def do_PUT(self) -> None:
        url = urlsplit(self.path)
        body = self.body()
        with LOCK:
            if url.path == "/_standin":
                SCENE.update({"jobs": {}, "actors": {}, "serve": [], "status": {}, **body})
                COUNTS.clear()
                PUTS.clear()
                SUBMITTED.clear()
                return self.answer(200, SCENE)
            COUNTS[f"PUT {url.path}"] += 1
            if url.path == SERVE_PATH:
                PUTS.append(body)
                return self.answer(200, {})
        return self.answer(404, {"error": "not here"})

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        body = self.body()
        with LOCK:
            COUNTS[f"POST {url.path}"] += 1
            if url.path == "/api/jobs/":
                SUBMITTED.append(body)
                return self.answer(200, {"submission_id": body.get("submission_id"), "job_id": None})
        return self.answer(404, {"error": "not here"})


ThreadingHTTPServer(("127.0.0.1", int(os.environ["CDSW_APP_PORT"])), Handler).serve_forever()
