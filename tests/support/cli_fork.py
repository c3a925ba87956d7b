"""`ray-cai` runs forked from a process that has already imported the CLI's libraries.

A `ray-cai` process spends most of its CPU starting: the interpreter, then httpx, pydantic, typer,
rich and the rest (~0.5 s of CPU of the ~0.7 s a `status` takes). The suite runs ~500 of them on two
cores. So each pytest process keeps one *zygote*: a single-threaded Python process that imports those
libraries once and then, per command, forks a child that runs `python -m ray_serve_cai.cli.main ARGS`
as a fresh process would — its own pid, the caller's argv, environment, working directory and
pipes, `ray_serve_cai` imported from scratch (so from the checkout the working directory holds, as
`python -m` does), the exit code of `sys.exit` — minus the libraries' import time.

    run(args, cwd=cwd, env=env, timeout=60)  # as subprocess.run([*RAY_CAI, *args], text=True, ...)

A command whose environment sets the interpreter's own variables (`PYTHON*`: a `PYTHONPATH` that
hides Ray, say) otherwise than the zygote's is executed with `subprocess.run`, as is every command
under `RAY_CAI_TEST_FORK=0` or when the zygote cannot start. Commands a test signals, kills or
writes to (`Popen`) keep a real `exec`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CLI_MODULE = "ray_serve_cai.cli.main"
EXECUTABLE = [sys.executable, "-m", CLI_MODULE]  # `ray-cai` as the tests execute it
# What `ray-cai` processes import before any of their own code runs (third-party only: the project's
# modules are imported by each child, from wherever its working directory says).
PRELOAD = (
    "httpx",
    "httpcore",
    "pydantic",
    "pydantic_core",
    "typer",
    "typer.main",
    "rich.console",
    "rich.table",
    "rich.text",
    "ruamel.yaml",
    "platformdirs",
    "psutil",
    "websockets",
    "certifi",
    "ssl",
    "json",
    "email.utils",
    # Serve's config schema, which `serve ...` and `up` of a cluster with Serve validate against
    # (~1.4 s of CPU: it imports Ray). Ray's core module starts one native thread on import; a forked
    # child has only the forking thread and never calls into Ray's core (the schema is pydantic), and
    # 200 forked commands from 4 threads never hung (2026-12-07).
    "ray.serve.schema",
)
START_SECONDS = 30.0
PARENT_CHECK_SECONDS = 5.0
ANSWER_SECONDS = 30.0  # the longest the zygote may take to answer a request (a socket timeout)


def _exit_code(error: SystemExit) -> int:
    """What the interpreter makes of `sys.exit(code)`."""
    if error.code is None:
        return 0
    if isinstance(error.code, int):
        return error.code
    print(error.code, file=sys.stderr)
    return 1


def _child(request: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become `python -m ray_serve_cai.cli.main ARGS`, run it, exit."""
    import io
    import runpy
    import traceback

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=True)
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", write_through=True
    )
    sys.path[0] = os.getcwd()  # `python -m` puts the working directory first
    sys.argv = [CLI_MODULE, *request["args"]]
    code = 0
    try:
        runpy.run_module(CLI_MODULE, run_name="__main__", alter_sys=True)
    except SystemExit as error:
        code = _exit_code(error)
    except BaseException:  # what the interpreter prints for an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
    os._exit(code)


def serve(path: str) -> None:
    """The zygote: import the libraries, then fork a command per connection."""
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            __import__(name)
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    listener.settimeout(PARENT_CHECK_SECONDS)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the per-command supervisors reap themselves
    print("ready", flush=True)
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if os.getppid() != parent:  # the pytest process is gone without closing us: so are we
                return
            continue
        conn.settimeout(None)
        with conn:
            message, fds, _flags, _address = socket.recv_fds(conn, 1 << 16, 3)
            chunks = [message]
            while chunk := conn.recv(1 << 16):
                chunks.append(chunk)
            if os.fork() == 0:  # the supervisor: starts the command, reports its pid and exit code
                listener.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                request = json.loads(b"".join(chunks))
                pid = os.fork()
                if pid == 0:
                    conn.close()
                    _child(request, fds)
                for fd in fds:
                    os.close(fd)
                conn.sendall(f"{pid}\n".encode())
                _, status = os.waitpid(pid, 0)
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                os._exit(0)
            for fd in fds:
                os.close(fd)


def _interpreter_settings(env: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """What the interpreter reads from the environment when it starts (a fork inherits the zygote's)."""
    return {key: value for key, value in env.items() if key.startswith("PYTHON")}


class Zygote:
    """One zygote process and how to run a command through it."""

    def __init__(self) -> None:
        self.interpreter = _interpreter_settings(os.environ)
        self.folder = tempfile.mkdtemp(prefix="ray-cai-zygote-")  # 0700: the requests carry API keys
        self.path = str(Path(self.folder) / "socket")
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parents[1])!r}); "
             f"from support.cli_fork import serve; serve({self.path!r})"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        line = _read_line(self.process.stdout, START_SECONDS)
        if line.strip() != "ready":
            self.close()
            raise RuntimeError(f"the ray-cai zygote did not start (said {line!r})")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)

    def run(
        self, args: list[str], *, cwd: Path | str, env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        stdin = os.open(os.devnull, os.O_RDONLY)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The zygote answers the pid at once, the exit code once the command's pipes are closed.
        conn.settimeout(ANSWER_SECONDS)
        try:
            conn.connect(self.path)
            request = json.dumps({"args": args, "cwd": str(cwd), "env": env}).encode()
            socket.send_fds(conn, [request], [stdin, out_write, err_write])
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            os.close(out_read)
            os.close(err_read)
            raise
        finally:
            for fd in (stdin, out_write, err_write):
                os.close(fd)
        with conn, os.fdopen(out_read, "rb") as out, os.fdopen(err_read, "rb") as err:
            reply = conn.makefile("r")
            pid = int(reply.readline())
            stdout, stderr, timed_out = _collect(out, err, timeout)
            if timed_out:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            code = int(reply.readline() or "-9")
        argv = [*EXECUTABLE, *args]
        text_out, text_err = stdout.decode(errors="replace"), stderr.decode(errors="replace")
        if timed_out:
            raise subprocess.TimeoutExpired(argv, timeout, text_out, text_err)
        return subprocess.CompletedProcess(argv, code, text_out, text_err)


def _read_line(stream: Any, timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else ""


def _collect(out: Any, err: Any, timeout: float) -> tuple[bytes, bytes, bool]:
    """Both pipes read to their end, or until the deadline (then True)."""
    deadline = time.monotonic() + timeout
    data: dict[int, list[bytes]] = {out.fileno(): [], err.fileno(): []}
    with selectors.DefaultSelector() as selector:
        selector.register(out, selectors.EVENT_READ)
        selector.register(err, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return b"".join(data[out.fileno()]), b"".join(data[err.fileno()]), True
            for key, _ in selector.select(left):
                chunk = os.read(key.fd, 1 << 16)
                if chunk:
                    data[key.fd].append(chunk)
                else:
                    selector.unregister(key.fileobj)
    return b"".join(data[out.fileno()]), b"".join(data[err.fileno()]), False


_zygote: Zygote | None = None
_lock = threading.Lock()


def _shared() -> Zygote | None:
    global _zygote
    with _lock:
        if _zygote is None or _zygote.process.poll() is not None:
            try:
                _zygote = Zygote()
            except (OSError, RuntimeError):
                return None
            atexit.register(_zygote.close)
        return _zygote


def zygote_for(env: dict[str, str]) -> Zygote | None:
    """The zygote that runs a command with this environment, or None: executed instead."""
    zygote = _shared() if os.environ.get("RAY_CAI_TEST_FORK", "1") != "0" else None
    return zygote if zygote is not None and _interpreter_settings(env) == zygote.interpreter else None


def execute(
    args: list[str], *, cwd: Path | str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`python -m ray_serve_cai.cli.main ARGS` executed (a fresh interpreter), output captured as text."""
    return subprocess.run(
        [*EXECUTABLE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def run(
    args: list[str],
    *,
    cwd: Path | str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """`python -m ray_serve_cai.cli.main ARGS`, its output captured as text: forked from the zygote,
    or (`RAY_CAI_TEST_FORK=0`, a `PYTHON*` setting of its own, or no zygote) executed. As with
    `subprocess.run`, `cwd` and `env` default to this process's."""
    cwd, env = cwd if cwd is not None else os.getcwd(), env if env is not None else dict(os.environ)
    zygote = zygote_for(env)
    if zygote is None:
        return execute(args, cwd=cwd, env=env, timeout=timeout)
    return zygote.run(args, cwd=cwd, env=env, timeout=timeout)
