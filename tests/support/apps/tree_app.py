"""Test app: starts a child and a grandchild that leaves the session, records their pids, serves HTTP."""

import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

SLEEPER = "import time\nwhile True: time.sleep(1)"
child = subprocess.Popen([sys.executable, "-c", SLEEPER])
escaped = subprocess.Popen([sys.executable, "-c", SLEEPER], start_new_session=True)
target = f"tree-pids-{os.environ['RAY_CAI_WORKLOAD_ID']}.json"
with open(f"{target}.tmp", "w") as handle:
    json.dump({"app": os.getpid(), "child": child.pid, "escaped": escaped.pid}, handle)
os.replace(f"{target}.tmp", target)


class Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


HTTPServer(("127.0.0.1", int(os.environ["CDSW_APP_PORT"])), Ok).serve_forever()
