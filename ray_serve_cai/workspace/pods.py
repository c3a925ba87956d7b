"""Pods: every job run and application in its own network and process namespaces, as on CML.

A pod is a network namespace (`ip netns`) on a private bridge of this workspace, with its own address
from the pod CIDR (a /16 inside CML's 100.64.0.0/10 by default), its own loopback and port space, and
its own process namespace (the pod's init, `podinit.py`, is its PID 1 and `/proc` shows only the pod).
Pods reach each other on any port through the bridge; nothing is routed beyond it (the host does not
forward), so nothing leaves the machine.

How the workspace meets the pods:

* **The workspace from a pod.** The workspace listens on the host's loopback (`http://localhost:<port>`,
  the application URLs `http://127.0.0.1:<port>`). Each pod gets relays on *its own* loopback on the
  same ports (sockets the server opens inside the pod's namespace), so the URLs the API hands out work
  unchanged in every pod — as CML's URLs work from every pod.
* **A pod from the workspace.** An application serves on its pod's `127.0.0.1:$CDSW_APP_PORT` (the
  same port in every pod). The pod's init forwards `<pod IP>:$CDSW_APP_PORT` there once the app
  listens (CML's per-pod proxy), and the application URL proxies to that address, across the bridge:
  a partitioned pod's URL is cut off like the pod itself.
* **pip.** The setup job installs packages: each pod's `PIP_PROXY` names a CONNECT proxy on its
  loopback (ports 80 and 443 only), the one way out of a pod to what the host itself may reach.
  The machine has no iptables/nft for NAT, and only pip reads `PIP_PROXY`.

Names carry a hash of the workspace home (several workspaces run on one machine); only names with
this workspace's prefix are ever deleted. Faults (`partition`, `shape`) act on a pod's link.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import functools
import hashlib
import ipaddress
import logging
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ray_serve_cai.errors import BadInput, OperationFailed

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Pods where possible when neither --pods nor --no-pods is given (shared-host, with the reason, where
# they cannot be made).
PODS_BY_DEFAULT = True
# CML gives every pod the same application ports; these are ours (below Ray's ranges).
POD_APP_PORT = 8100
POD_READONLY_PORT = 8101
PIP_PROXY_PORT = 3128
PIP_PROXY_ALLOWED_PORTS = (80, 443)
CML_POD_RANGE = ipaddress.IPv4Network("100.64.0.0/10")
NETNS_DIR = Path("/run/netns")
HOST_LOCK = Path("/run/lock/ray-cai-pods.lock")
CLONE_NEWNET = 0x40000000
IP_TIMEOUT_SECONDS = 20.0
RELAY_BUFFER = 65536


class PodError(OperationFailed):
    """A pod (or the workspace's bridge) could not be created or changed."""


def pods_possible() -> tuple[bool, str]:
    """(True, "") where this process can make pods, else (False, the reason)."""
    if not sys.platform.startswith("linux"):
        return False, f"pods need Linux network namespaces (this is {sys.platform})"
    if os.geteuid() != 0:
        return False, "pods need root (CAP_NET_ADMIN, CAP_SYS_ADMIN); running as an unprivileged user"
    missing = [tool for tool in ("ip", "nsenter", "unshare", "tc") if shutil.which(tool) is None]
    if missing:
        return False, f"pods need {', '.join(missing)} (iproute2, util-linux)"
    try:
        NETNS_DIR.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return False, f"cannot create {NETNS_DIR}: {exc.strerror}"
    return True, ""


def choose_network(home: Path, pods: bool | None, pod_cidr: str | None) -> tuple[PodNetwork | None, str]:
    """The workspace's pod network (its bridge set up) and why; (None, why) for shared-host.

    `pods` None: the default (`PODS_BY_DEFAULT`): pods where this process can make them, else
    shared-host with the reason; True: pods or an error; False: shared-host."""
    if pods is None and pod_cidr:
        pods = True  # a pod CIDR asks for pods
    if pods is None and not PODS_BY_DEFAULT:
        return None, "the default here (PODS_BY_DEFAULT is off; --pods gives every workload a pod)"
    if pods is False:
        return None, "asked for with --no-pods"
    possible, why = pods_possible()
    if not possible:
        if pods:
            raise PodError(f"--pods: {why}")
        return None, f"{why}: every workload on the host"
    try:
        cidr = parse_pod_cidr(pod_cidr) if pod_cidr else None
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    network = PodNetwork(home, cidr)
    try:
        network.setup()
    except PodError as exc:
        if pods:
            raise
        return None, f"pods could not be made ({exc})"
    return network, f"root on Linux: every workload in its own pod on {network.cidr}"


@functools.cache
def init_python() -> str:
    """The interpreter of a pod's init (stdlib only, on every workload start): the system's Python
    where it is recent enough — it starts several times faster than a pyenv build — else this one."""
    system = Path("/usr/bin/python3")
    if system.exists():
        try:
            done = subprocess.run(
                [str(system), "-I", "-S", "-c", "import sys; sys.exit(sys.version_info < (3, 9))"],
                capture_output=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return sys.executable
        if done.returncode == 0:
            return str(system)
    return sys.executable


def home_hash(home: Path) -> str:
    return hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:6]


def _run_ip(args: Sequence[str], *, stdin: str | None = None, check: bool = True) -> str:
    try:
        done = subprocess.run(
            list(args), input=stdin, capture_output=True, text=True, timeout=IP_TIMEOUT_SECONDS, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PodError(f"{' '.join(args[:3])}: {exc}") from None
    if check and done.returncode != 0:
        raise PodError(f"{' '.join(args)}: {done.stderr.strip() or f'exit code {done.returncode}'}")
    return done.stdout


@contextlib.contextmanager
def _host_lock() -> Iterator[None]:
    """Serialises CIDR choice and bridge creation among the workspaces of this machine."""
    HOST_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(HOST_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _host_networks(skip_device: str) -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host has an address or a route in (except on `skip_device`)."""
    found: list[ipaddress.IPv4Network] = []
    for line in _run_ip(["ip", "-4", "-o", "addr", "show"]).splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[1] != skip_device:
            with contextlib.suppress(ValueError):
                found.append(ipaddress.IPv4Interface(parts[3]).network)
    for line in _run_ip(["ip", "-4", "route", "show", "table", "all"]).splitlines():
        parts = line.split()
        if not parts or parts[0] in ("default", "broadcast", "local") or f"dev {skip_device}" in line:
            continue
        with contextlib.suppress(ValueError):
            found.append(ipaddress.IPv4Network(parts[0], strict=False))
    return found


def parse_pod_cidr(text: str) -> ipaddress.IPv4Network:
    """A pod CIDR given by a user: IPv4, at least a /24, at most a /8."""
    try:
        network = ipaddress.IPv4Network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"--pod-cidr: {text!r} is not an IPv4 network like 100.70.0.0/16 ({exc})") from None
    if not 8 <= network.prefixlen <= 24:
        raise ValueError(f"--pod-cidr: {text} must be between a /8 and a /24")
    return network


@dataclass(frozen=True)
class Pod:
    """One pod: its address, its network namespace and the host end of its link."""

    ip: str
    index: int
    netns: str
    veth: str

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns


@dataclass
class _Fault:
    kind: str  # "partition" | "shape"
    detail: dict[str, float] = field(default_factory=dict)
    until: float | None = None  # loop time; None: until healed
    timer: asyncio.TimerHandle | None = None
    shaper: LinkShaper | None = None


class PodNetwork:
    """The bridge of one workspace and its pods (create, adopt, remove, sweep, faults)."""

    def __init__(self, home: Path, cidr: ipaddress.IPv4Network | None = None) -> None:
        self.home = home
        self.hash = home_hash(home)
        self.bridge = f"rcb{self.hash}"
        self.netns_prefix = f"ray-cai-{self.hash}-"
        self.veth_prefix = f"rcv{self.hash}"
        self.requested_cidr = cidr
        self.cidr: ipaddress.IPv4Network = cidr or CML_POD_RANGE
        self.gateway = ""
        self._lock = threading.Lock()
        self._pods: dict[str, Pod] = {}  # by ip
        self._cursor = 2
        self.relays: LoopbackRelays | None = None
        self._faults: dict[str, _Fault] = {}  # by pod ip

    def __repr__(self) -> str:
        return f"PodNetwork(bridge={self.bridge}, cidr={self.cidr})"

    # ---------------------------------------------------------------- bridge

    def setup(self) -> None:
        """Create the bridge (or reuse the one an earlier server of this home left) with its gateway."""
        with _host_lock():
            existing = self._bridge_network()
            if existing is not None and (self.requested_cidr in (None, existing)):
                self.cidr = existing
            else:
                if existing is not None:  # another CIDR was asked for: the old bridge goes
                    self.remove_all()
                self.cidr = self.requested_cidr or self._free_cidr()
                taken = [n for n in _host_networks(self.bridge) if n.overlaps(self.cidr)]
                if taken:
                    raise PodError(f"pod CIDR {self.cidr} overlaps {taken[0]} on this host")
                gateway = f"{self.cidr[1]}/{self.cidr.prefixlen}"
                _run_ip(
                    ["ip", "-batch", "-"],
                    stdin=(
                        f"link add {self.bridge} type bridge\n"
                        f"addr add {gateway} dev {self.bridge}\n"
                        f"link set {self.bridge} up\n"
                    ),
                )
        self.gateway = str(self.cidr[1])
        init_python()  # chosen once, here, not on the event loop at the first start

    def _bridge_network(self) -> ipaddress.IPv4Network | None:
        out = _run_ip(["ip", "-4", "-o", "addr", "show", "dev", self.bridge], check=False)
        for line in out.splitlines():
            parts = line.split()
            if len(parts) > 3:
                return ipaddress.IPv4Interface(parts[3]).network
        if self._link_exists(self.bridge):  # a bridge without its address: start over
            _run_ip(["ip", "link", "del", self.bridge], check=False)
        return None

    @staticmethod
    def _link_exists(name: str) -> bool:
        return Path("/sys/class/net", name).exists()

    def _free_cidr(self) -> ipaddress.IPv4Network:
        """A /16 of 100.64.0.0/10 no other network of the host uses, starting at one chosen by the
        home's hash (so parallel workspaces rarely even compete for it)."""
        used = _host_networks(self.bridge)
        subnets = list(CML_POD_RANGE.subnets(new_prefix=16))
        start = int(self.hash, 16) % len(subnets)
        for offset in range(len(subnets)):
            candidate = subnets[(start + offset) % len(subnets)]
            if not any(candidate.overlaps(n) for n in used):
                return candidate
        raise PodError("every /16 of 100.64.0.0/10 is in use on this host: pass --pod-cidr")

    # ---------------------------------------------------------------- pods

    def _pod_at(self, index: int) -> Pod:
        return Pod(
            ip=str(self.cidr[index]),
            index=index,
            netns=f"{self.netns_prefix}{index}",
            veth=f"{self.veth_prefix}{index:04x}"[:15],
        )

    def pods(self) -> list[Pod]:
        with self._lock:
            return list(self._pods.values())

    def pod(self, ip: str) -> Pod | None:
        with self._lock:
            return self._pods.get(ip)

    def create(self) -> Pod:
        """A new pod on a fresh address (round robin: a restarted workload gets another one)."""
        size = self.cidr.num_addresses
        with self._lock:
            for _ in range(size):
                index = self._cursor
                self._cursor = self._cursor + 1 if self._cursor + 1 < size - 1 else 2
                pod = self._pod_at(index)
                if pod.ip not in self._pods and not pod.netns_path.exists():
                    self._pods[pod.ip] = pod
                    break
            else:
                raise PodError(f"no free address left in the pod CIDR {self.cidr}")
        try:
            _run_ip(
                ["ip", "-batch", "-"],
                stdin=(
                    f"netns add {pod.netns}\n"
                    f"link add {pod.veth} type veth peer name eth0 netns {pod.netns}\n"
                    f"link set {pod.veth} master {self.bridge} up\n"
                ),
            )
            _run_ip(
                ["ip", "-n", pod.netns, "-batch", "-"],
                stdin=(
                    f"addr add {pod.ip}/{self.cidr.prefixlen} dev eth0\nlink set eth0 up\nlink set lo up\n"
                ),
            )
        except PodError:
            self._delete(pod)
            with self._lock:
                self._pods.pop(pod.ip, None)
            raise
        return pod

    def adopt(self, ip: str) -> Pod | None:
        """The pod an earlier server made at `ip`, when it still exists (re-adoption)."""
        try:
            address = ipaddress.IPv4Address(ip)
        except ValueError:
            return None
        if address not in self.cidr:
            return None
        pod = self._pod_at(int(address) - int(self.cidr.network_address))
        if not pod.netns_path.exists():
            return None
        with self._lock:
            self._pods[pod.ip] = pod
            self._cursor = max(self._cursor, pod.index + 1)
        # Faults never outlive the server that made them: a partitioned link comes up again, a
        # netem qdisc goes (a user-space shaper ended with the killed server's descriptors).
        _run_ip(["ip", "link", "set", pod.veth, "up"], check=False)
        _run_ip(["tc", "-n", pod.netns, "qdisc", "del", "dev", "eth0", "root"], check=False)
        return pod

    def remove(self, pod: Pod) -> None:
        """Delete the pod's link and namespace (blocking)."""
        with self._lock:
            self._pods.pop(pod.ip, None)
        self._drop_faults(pod.ip)
        self._delete(pod)

    def _delete(self, pod: Pod) -> None:
        if self._link_exists(pod.veth):
            _run_ip(["ip", "link", "del", pod.veth], check=False)
        if pod.netns_path.exists():
            _run_ip(["ip", "netns", "del", pod.netns], check=False)

    def own_leftovers(self) -> tuple[list[str], list[str]]:
        """(namespaces, links) named for this workspace that exist right now."""
        names = sorted(p.name for p in NETNS_DIR.glob(f"{self.netns_prefix}*")) if NETNS_DIR.is_dir() else []
        links = sorted(p.name for p in Path("/sys/class/net").glob(f"{self.veth_prefix}*"))
        if self._link_exists(self.bridge):
            links.append(self.bridge)
        return names, links

    def sweep(self, keep: Iterable[str] = ()) -> list[str]:
        """Delete this workspace's namespaces and links that belong to no pod in `keep` (ips)."""
        kept = {self._pod_at(int(ipaddress.IPv4Address(ip)) - int(self.cidr.network_address)).netns
                for ip in keep if ip and ipaddress.IPv4Address(ip) in self.cidr}  # fmt: skip
        kept_links = {f"{self.veth_prefix}{int(n.rsplit('-', 1)[1]):04x}"[:15] for n in kept}
        removed = []
        names, links = self.own_leftovers()
        for link in links:
            if link != self.bridge and link not in kept_links:
                _run_ip(["ip", "link", "del", link], check=False)
                removed.append(link)
        for name in names:
            if name not in kept:
                _run_ip(["ip", "netns", "del", name], check=False)
                removed.append(name)
        return removed

    def remove_all(self) -> None:
        """Every pod of this workspace and its bridge (workspace stop)."""
        with self._lock:
            self._pods.clear()
        for ip in {key.split("/", 1)[0] for key in self._faults}:
            self._drop_faults(ip)
        self.sweep(())
        if self._link_exists(self.bridge):
            _run_ip(["ip", "link", "del", self.bridge], check=False)

    # ---------------------------------------------------------------- process start

    def wrap(
        self, pod: Pod, command: Sequence[str], *, exit_file: Path, forward_port: int | None
    ) -> list[str]:
        """The command line that runs `command` as PID 1's child in a new process namespace in `pod`."""
        init = [
            init_python(),
            "-I",
            "-S",
            str(Path(__file__).with_name("podinit.py")),
            "--exit-file",
            str(exit_file),
        ]
        if forward_port is not None:
            init += ["--forward", f"{pod.ip}:{forward_port}"]
        return [
            "nsenter", f"--net={pod.netns_path}", "--",
            "unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--",
            *init, "--", *command,
        ]  # fmt: skip

    # ---------------------------------------------------------------- faults

    def partition(self, pod: Pod) -> None:
        """Cut the pod off from every other pod and from the workspace: its link goes down (its
        application URL too) and its loopback relays refuse. Blocking."""
        _run_ip(["ip", "link", "set", pod.veth, "down"])
        if self.relays is not None:
            self.relays.block(pod.ip)
        self._faults.setdefault(f"{pod.ip}/partition", _Fault("partition"))

    def shape(
        self,
        pod: Pod,
        delay_ms: float,
        jitter_ms: float,
        loss_percent: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """netem on the pod's side of its link (its egress): every packet it sends to the pod network
        waits `delay_ms` ± `jitter_ms`, `loss_percent` % of them are lost. Blocking.

        `tc netem` where the kernel has it; else (this machine's kernel has no sch_netem) the same in
        user space: the pod's routes to the pod network go through a TUN device whose packets this
        process delays, drops, and sends on through the pod's own link (`LinkShaper`)."""
        self._heal_one(pod.ip, "shape")
        detail = {"delay_ms": delay_ms, "jitter_ms": jitter_ms, "loss_percent": loss_percent}
        fault = _Fault("shape", detail)
        args = ["tc", "-n", pod.netns, "qdisc", "replace", "dev", "eth0", "root", "netem"]
        if delay_ms or jitter_ms:
            args += ["delay", f"{delay_ms:g}ms"] + ([f"{jitter_ms:g}ms"] if jitter_ms else [])
        if loss_percent:
            args += ["loss", f"{loss_percent:g}%"]
        try:
            _run_ip(args)
        except PodError as exc:
            if "unknown" not in str(exc):
                raise
            fault.shaper = LinkShaper(pod, self.cidr, delay_ms, jitter_ms, loss_percent, loop)
            fault.shaper.start()
        self._faults[f"{pod.ip}/shape"] = fault

    def shape_all(
        self,
        delay_ms: float,
        jitter_ms: float,
        loss_percent: float,
        seconds: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Shape every pod now and every pod made until healed (or until `seconds` are over)."""
        self._clear_default_shape()
        fault = _Fault("shape", {"delay_ms": delay_ms, "jitter_ms": jitter_ms, "loss_percent": loss_percent})
        self._faults["*/shape"] = fault
        if seconds > 0:
            fault.until = loop.time() + seconds
            fault.timer = loop.call_later(seconds, lambda: loop.run_in_executor(None, self.heal))
        for pod in self.pods():
            self.shape(pod, delay_ms, jitter_ms, loss_percent, loop)

    def shape_new_pod(self, pod: Pod, loop: asyncio.AbstractEventLoop) -> None:
        """A pod made while every pod is shaped is shaped too."""
        fault = self._faults.get("*/shape")
        if fault is not None:
            detail = fault.detail
            self.shape(pod, detail["delay_ms"], detail["jitter_ms"], detail["loss_percent"], loop)

    def _clear_default_shape(self) -> None:
        fault = self._faults.pop("*/shape", None)
        if fault is not None and fault.timer is not None:
            fault.timer.cancel()

    def schedule_heal(self, pod: Pod, kind: str, seconds: float) -> None:
        """End the pod's `kind` fault after `seconds` (0: only `heal` ends it). Call in the event loop."""
        fault = self._faults.get(f"{pod.ip}/{kind}")
        if fault is None:
            return
        if fault.timer is not None:
            fault.timer.cancel()
            fault.timer, fault.until = None, None
        if seconds > 0:
            loop = asyncio.get_running_loop()
            fault.until = loop.time() + seconds

            def heal_later() -> None:
                loop.run_in_executor(None, self._heal_one, pod.ip, kind)

            fault.timer = loop.call_later(seconds, heal_later)

    def _drop_faults(self, ip: str) -> None:
        for key in [k for k in self._faults if k.startswith(f"{ip}/")]:
            fault = self._faults.pop(key)
            if fault.timer is not None:
                fault.timer.cancel()
            if fault.shaper is not None:
                fault.shaper.stop()

    def _heal_one(self, ip: str, kind: str) -> None:
        fault = self._faults.pop(f"{ip}/{kind}", None)
        if fault is not None and fault.timer is not None:
            fault.timer.cancel()
        if fault is not None and fault.shaper is not None:
            fault.shaper.stop()
            return
        if fault is None:
            return
        pod = self.pod(ip)
        if pod is None:
            return
        if kind == "partition":
            if self._link_exists(pod.veth):
                _run_ip(["ip", "link", "set", pod.veth, "up"], check=False)
            if self.relays is not None:
                self.relays.unblock(ip)
        else:
            _run_ip(["tc", "-n", pod.netns, "qdisc", "del", "dev", "eth0", "root"], check=False)

    def heal(self) -> int:
        """End every fault (blocking); returns how many there were."""
        keys = list(self._faults)
        self._clear_default_shape()
        for key in [k for k in keys if not k.startswith("*/")]:
            ip, kind = key.split("/", 1)
            self._heal_one(ip, kind)
        return len(keys)

    def fault_list(self) -> list[dict[str, object]]:
        loop_time = _loop_time()
        return [
            {
                "pod_ip": key.split("/", 1)[0],
                "kind": f.kind,
                **f.detail,
                "seconds_left": None if f.until is None else round(max(f.until - loop_time, 0.0), 3),
            }
            for key, f in sorted(self._faults.items())
        ]


def _loop_time() -> float:
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return 0.0


# ------------------------------------------------------------------------ sockets inside a pod

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def in_netns(netns_path: Path, work: Callable[[], T]) -> T:
    """`work()` run inside another network namespace (the sockets and devices it makes stay there),
    in a thread of its own: only that thread switches namespaces."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(netns_path, os.O_RDONLY)
        try:
            _setns(target)
            try:
                result.append(work())
            finally:
                _setns(own)
        except BaseException as exc:  # reported to the caller's thread
            failure.append(exc)
        finally:
            os.close(own)
            os.close(target)

    thread = threading.Thread(target=run, name="netns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise PodError(f"in {netns_path.name}: {failure[0]}")
    return result[0]


TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
SHAPER_DEVICE = "shape0"


class LinkShaper:
    """User-space netem for one pod's egress to the pod network (for kernels without sch_netem).

    In the pod: a TUN device with routes to both halves of the pod CIDR (more specific than the
    link's own route, so every packet to another pod or the gateway enters it) and a raw IP socket
    bound to the pod's link. Each packet read from the TUN device is dropped with `loss_percent`
    probability, else sent on through the raw socket after `delay_ms` ± `jitter_ms` (uniform). The
    device and its routes vanish when its descriptor is closed (`stop`)."""

    def __init__(
        self,
        pod: Pod,
        cidr: ipaddress.IPv4Network,
        delay_ms: float,
        jitter_ms: float,
        loss_percent: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.pod, self.cidr, self.loop = pod, cidr, loop
        self.delay, self.jitter, self.loss = delay_ms / 1000, jitter_ms / 1000, loss_percent / 100
        self._tun: int | None = None
        self._raw: socket.socket | None = None
        self._closed = False
        self._random = random.Random()

    def start(self) -> None:
        def make() -> tuple[int, socket.socket]:
            tun = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            try:
                fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", SHAPER_DEVICE.encode(), IFF_TUN | IFF_NO_PI))
                raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            except BaseException:
                os.close(tun)
                raise
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
            raw.setblocking(False)
            return tun, raw

        self._tun, self._raw = in_netns(self.pod.netns_path, make)
        halves = list(self.cidr.subnets(prefixlen_diff=1))
        try:
            _run_ip(
                ["ip", "-n", self.pod.netns, "-batch", "-"],
                stdin=f"link set {SHAPER_DEVICE} up\n"
                + "".join(f"route add {half} dev {SHAPER_DEVICE} src {self.pod.ip}\n" for half in halves),
            )
        except PodError:
            self._close()
            raise
        self.loop.call_soon_threadsafe(self.loop.add_reader, self._tun, self._on_packet)

    def _on_packet(self) -> None:
        for _ in range(256):  # what is queued now, then back to the loop
            if self._closed or self._tun is None:
                return
            try:
                packet = os.read(self._tun, 65535)
            except BlockingIOError:
                return
            except OSError:
                return
            if len(packet) < 20 or self._random.random() < self.loss:
                continue
            wait = max(self.delay + self._random.uniform(-self.jitter, self.jitter), 0.0)
            self.loop.call_later(wait, self._send, packet)

    def _send(self, packet: bytes) -> None:
        if self._closed or self._raw is None:
            return
        with contextlib.suppress(OSError):  # a full buffer loses the packet, as a link would
            self._raw.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))

    def stop(self) -> None:
        """End the shaping (thread-safe): the TUN device and its routes go, the link is direct again."""
        try:
            in_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            in_loop = False
        if in_loop:
            self._close()
        else:
            self.loop.call_soon_threadsafe(self._close)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._tun is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self._tun)
            os.close(self._tun)
            self._tun = None
        if self._raw is not None:
            self._raw.close()
            self._raw = None


def listen_in_netns(
    netns_path: Path, ports: Iterable[int], host: str = "127.0.0.1"
) -> dict[int, socket.socket]:
    """Listening sockets on `host:port` inside another network namespace (a socket keeps the
    namespace it was made in). Done in a thread of its own, which alone switches namespaces.
    A port that cannot be bound there is left out."""
    wanted = list(ports)
    result: dict[int, socket.socket] = {}

    def bind_all() -> dict[int, socket.socket]:
        for port in wanted:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                sock.listen(128)
            except OSError as exc:
                sock.close()
                logger.warning("pod %s: cannot relay port %d: %s", netns_path.name, port, exc.strerror)
                continue
            sock.setblocking(False)
            result[port] = sock
        return result

    try:
        return in_netns(netns_path, bind_all)
    except PodError as err:
        for sock in result.values():
            sock.close()
        raise PodError(f"cannot open sockets: {err}") from None


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(RELAY_BUFFER):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter], b: tuple[asyncio.StreamReader, asyncio.StreamWriter]
) -> None:
    """Copy both ways until both sides ended, then close both."""
    try:
        await asyncio.gather(_pump(a[0], b[1]), _pump(b[0], a[1]))
    finally:
        for writer in (a[1], b[1]):
            writer.close()


class LoopbackRelays:
    """In every pod: the workspace's own ports (API, application URLs) on the pod's loopback, relayed
    to the host's loopback; plus pip's CONNECT proxy (`PIP_PROXY_PORT`)."""

    def __init__(self) -> None:
        self._ports: set[int] = set()
        self._servers: dict[str, dict[int, asyncio.Server]] = {}  # pod ip -> port -> server
        self._paths: dict[str, Path] = {}
        self._blocked: set[str] = set()
        self._connections: dict[str, set[asyncio.StreamWriter]] = {}
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"LoopbackRelays(pods={len(self._servers)}, ports={sorted(self._ports)})"

    def block(self, ip: str) -> None:
        """A partitioned pod: new connections are refused and open ones cut."""
        self._blocked.add(ip)
        for writer in list(self._connections.get(ip, ())):
            writer.transport.abort()

    def unblock(self, ip: str) -> None:
        self._blocked.discard(ip)

    async def set_ports(self, ports: Iterable[int]) -> None:
        """The workspace ports every pod relays (added and removed in every pod)."""
        async with self._lock:
            wanted = set(ports)
            added, gone = wanted - self._ports, self._ports - wanted
            self._ports = wanted
            for ip, servers in self._servers.items():
                for port in gone:
                    server = servers.pop(port, None)
                    if server is not None:
                        server.close()
                await self._open(ip, servers, added)

    async def add_pod(self, pod: Pod) -> None:
        async with self._lock:
            self._paths[pod.ip] = pod.netns_path
            servers = self._servers.setdefault(pod.ip, {})
            await self._open(pod.ip, servers, {*self._ports, PIP_PROXY_PORT} - set(servers))

    async def remove_pod(self, ip: str) -> None:
        async with self._lock:
            self._paths.pop(ip, None)
            self._blocked.discard(ip)
            for server in self._servers.pop(ip, {}).values():
                server.close()
            for writer in list(self._connections.pop(ip, ())):
                writer.transport.abort()

    async def close(self) -> None:
        for ip in list(self._servers):
            await self.remove_pod(ip)

    async def _open(self, ip: str, servers: dict[int, asyncio.Server], ports: set[int]) -> None:
        path = self._paths.get(ip)
        if not ports or path is None or not path.exists():
            return
        sockets = await asyncio.to_thread(listen_in_netns, path, sorted(ports))
        for port, sock in sockets.items():
            handler = self._connect_proxy if port == PIP_PROXY_PORT else self._relay_to(port)
            servers[port] = await asyncio.start_server(self._guarded(ip, handler), sock=sock)

    def _guarded(
        self,
        ip: str,
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], object],
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if ip in self._blocked:
                writer.transport.abort()
                return
            tracked = self._connections.setdefault(ip, set())
            tracked.add(writer)
            try:
                await handler(reader, writer)  # type: ignore[misc]
            except (ConnectionError, OSError, asyncio.IncompleteReadError):
                writer.transport.abort()
            finally:
                tracked.discard(writer)

        return serve

    @staticmethod
    def _relay_to(port: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]:
        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                upstream = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            except (OSError, asyncio.TimeoutError):
                writer.transport.abort()
                return
            await splice((reader, writer), upstream)

        return relay

    @staticmethod
    async def _connect_proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """`CONNECT host:port HTTP/1.1` to ports 80/443 of what the host can reach (pip's way out)."""
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        method, _, rest = head.decode("latin-1").partition(" ")
        target = rest.split(" ", 1)[0]
        host, _, port_text = target.rpartition(":")
        if (
            method.upper() != "CONNECT"
            or not port_text.isdigit()
            or int(port_text) not in PIP_PROXY_ALLOWED_PORTS
        ):
            writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        try:
            upstream = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port_text)), 30)
        except (OSError, asyncio.TimeoutError):
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await splice((reader, writer), upstream)


def leftovers_of(home: Path) -> tuple[list[str], list[str]]:
    """(namespaces, links) this workspace home's pods left on the machine (for checks and stop)."""
    return PodNetwork(home).own_leftovers()


def pod_names(home: Path, cidr: str, ip: str) -> tuple[str, str]:
    """(namespace, link) of the pod at `ip` of the workspace at `home` with pod CIDR `cidr` (for checks)."""
    network = PodNetwork(home, ipaddress.IPv4Network(cidr))
    pod = network._pod_at(int(ipaddress.IPv4Address(ip)) - int(network.cidr.network_address))
    return pod.netns, pod.veth


def remove_leftovers(home: Path) -> None:
    """Delete every pod and the bridge of `home` (a `workspace stop` after the server was killed)."""
    if pods_possible()[0]:
        PodNetwork(home).remove_all()
