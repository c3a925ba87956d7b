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
import selectors
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


class _Side:
    """One socket of a relayed connection: bytes waiting to be written to it, and whether its
    peer has ended (then, once `pending` is written, its write side is shut)."""

    __slots__ = ("peer", "peer_ended", "pending", "reading", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.peer: _Side | None = None
        self.pending = bytearray()
        self.peer_ended = False
        self.reading = True


class _Relay:
    """Every forwarded connection in one thread around one selector: a request costs a wake-up, a
    `recv` and a `send` per direction (no thread per direction, no lock hand-over per chunk).
    Reading from a side stops while its peer has more than `BUFFER` bytes not yet written."""

    def __init__(self, listener: socket.socket, port: int) -> None:
        self.listener, self.port = listener, port
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, None)

    def run(self) -> None:
        while True:
            for key, events in self.selector.select():
                side = key.data
                if side is None:
                    self._accept()
                    continue
                if events & selectors.EVENT_WRITE:
                    self._flush(side)
                if events & selectors.EVENT_READ and side.reading:
                    self._read(side)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        except OSError:
            client.close()
            return
        one, other = _Side(client), _Side(upstream)
        one.peer, other.peer = other, one
        for side in (one, other):
            side.sock.setblocking(False)
            # A relay passes each write on as it comes: with Nagle on, a response written in two
            # parts (head, then body) waits for the peer's delayed ACK — 40 ms per request.
            with contextlib.suppress(OSError):
                side.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.selector.register(side.sock, selectors.EVENT_READ, side)

    def _read(self, side: _Side) -> None:
        peer = side.peer
        assert peer is not None
        try:
            data = side.sock.recv(BUFFER)
        except BlockingIOError:
            return
        except OSError:
            self._close(side)
            return
        if not data:  # this side ended: pass it on once what is pending for the peer is written
            side.reading = False
            peer.peer_ended = True
            if not side.peer_ended or peer.pending:
                self._flush(peer)
                self._watch(side)
            else:
                self._close(side)
            return
        peer.pending += data
        self._flush(peer)

    def _flush(self, side: _Side) -> None:
        try:
            while side.pending:
                sent = side.sock.send(side.pending)
                del side.pending[:sent]
        except BlockingIOError:
            pass
        except OSError:
            self._close(side)
            return
        if not side.pending and side.peer_ended:
            with contextlib.suppress(OSError):
                side.sock.shutdown(socket.SHUT_WR)
            if not side.reading:
                self._close(side)
                return
        self._watch(side)
        if side.peer is not None:
            self._watch(side.peer)

    def _watch(self, side: _Side) -> None:
        """Select a side for reading while it reads and its peer has room, for writing while it has
        bytes pending; unregistered when neither."""
        peer = side.peer
        reading = side.reading and (peer is None or len(peer.pending) <= BUFFER)
        events = (selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if side.pending else 0)
        try:
            current = self.selector.get_key(side.sock).events
        except (KeyError, ValueError):
            current = 0
        if events == current:
            return
        if not events:
            self.selector.unregister(side.sock)
        elif not current:
            self.selector.register(side.sock, events, side)
        else:
            self.selector.modify(side.sock, events, side)

    def _close(self, side: _Side) -> None:
        for each in (side, side.peer):
            if each is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(each.sock)
            each.sock.close()
            each.pending.clear()
            each.reading = False


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
    listener.setblocking(False)
    _Relay(listener, port).run()


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
