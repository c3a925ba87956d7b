"""Test application: answers HTTP on 127.0.0.1:$CDSW_APP_PORT, echoing the request as JSON.

`APP_LISTEN_DELAY` (seconds) delays listening; a `/exit?code=N` request makes it exit with N.
"""

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

ENV_PREFIXES = ("APP_", "PROJECT_", "CDSW_PROJECT")


class Echo(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        url = urlparse(self.path)
        if url.path == "/exit":
            code = int(parse_qs(url.query).get("code", ["0"])[0])
            threading.Timer(0.1, lambda: os._exit(code)).start()
        payload = json.dumps(
            {
                "method": self.command,
                "path": url.path,
                "query": url.query,
                "body": body,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "env": {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        sys.stderr.write("request\n")


time.sleep(float(os.environ.get("APP_LISTEN_DELAY", "0")))
ThreadingHTTPServer(("127.0.0.1", int(os.environ["CDSW_APP_PORT"])), Echo).serve_forever()
