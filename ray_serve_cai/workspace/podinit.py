"""The init of a pod: PID 1 of the pod's process namespace (stdlib only; run with `python -I`).

`podinit.py --exit-file F [--forward IP:PORT] -- COMMAND...` starts COMMAND, reaps every orphan of the
pod (PID 1's duty), and when COMMAND ends writes its exit code to F and exits with it — which ends
every process left in the pod, as a pod ends with its workload. SIGTERM/SIGINT/SIGHUP reach COMMAND
directly (the workspace signals the whole process group); the init passes them on only to a COMMAND
that left the group.

`--forward IP:PORT` is CML's per-pod proxy: once the application listens on `127.0.0.1:PORT` (as CML
requires), `IP:PORT` (the pod's address) is forwarded there, so the workspace's application URL and
other pods reach it. An application that listens on every address itself needs no forwarder.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

BUFFER = 65536


def _connects(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(BUFFER):
            target.sendall(data)
        target.shutdown(socket.SHUT_WR)
    except OSError:
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_RDWR)


def _serve_connection(client: socket.socket, port: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    # A relay passes each write on as it comes: with Nagle on, a response written in two parts
    # (head, then body) waits for the peer's delayed ACK — 40 ms per request.
    for sock in (client, upstream):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _forward(ip: str, port: int) -> None:
    while not _connects("127.0.0.1", port):
        time.sleep(0.1)
    if _connects(ip, port):  # the application listens on every address itself
        return
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((ip, port))
    except OSError as exc:
        print(f"[pod] cannot forward {ip}:{port}: {exc.strerror}", file=sys.stderr, flush=True)
        return
    listener.listen(128)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_serve_connection, args=(client, port), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(prog="podinit")
    parser.add_argument("--exit-file", required=True)
    parser.add_argument("--forward", default="")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.exit_file)

    child: subprocess.Popen[bytes] | None = None

    def pass_on(signum: int, _: object) -> None:
        if child is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(child.pid) != os.getpgrp():
                os.kill(child.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, pass_on)
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        print(f"[pod] cannot start {command[0]}: {exc.strerror}", file=sys.stderr, flush=True)
        code = 127
    else:
        if args.forward:
            ip, _, port = args.forward.rpartition(":")
            threading.Thread(target=_forward, args=(ip, int(port)), daemon=True).start()
        code = 0
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid == child.pid:
                code = os.waitstatus_to_exitcode(status)
                code = 128 - code if code < 0 else code  # as sh reports a signal
                break
    with open(args.exit_file, "w") as handle:
        handle.write(f"{code}\n")
    os._exit(code)


if __name__ == "__main__":
    main()
