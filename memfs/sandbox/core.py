"""The :class:`Sandbox` as seen from outside: start it, find it again, run commands in it."""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Iterator, Mapping, Sequence

from .. import control
from ..mountinfo import read_mountinfo
from . import enter, holder
from .checks import (Expectations, SandboxError, check_netns, check_overlays, fuse_identity,
                     initial_netns_inodes, ns_ino, require_root)
from .libc import CLONE_NEWNET, SIOCGSKNS, setns

log = logging.getLogger("memfs.sandbox")

NETLINK_KOBJECT_UEVENT = 15


@dataclass
class Sandbox:
    """A live sandbox for the memfs mount at ``mnt``. Make one with :meth:`start`."""

    mnt: str
    holder: int                       # host pid of the sandbox's pid 1
    middle: subprocess.Popen | None   # the process that created the namespaces
    dev: str                          # FUSE device "major:minor"
    netns: int
    userns: int
    mntns: int
    initial_net: list[int]
    overlays: list[list[str]]
    life_w: int | None = None
    state_file: str | None = None
    started: float = field(default_factory=time.time)
    _closed: bool = False

    # -- creation ------------------------------------------------------------

    @classmethod
    def start(cls, mnt: str | os.PathLike[str], *, timeout: float = 20.0, binds: Sequence[tuple[str, str]] = (),
              state_file: str | None = None, _test_keep: Sequence[str] = ()) -> Sandbox:
        """Create the namespaces and overlays for the memfs mount at ``mnt``."""
        require_root()
        mnt = os.path.realpath(os.fspath(mnt))
        ident = fuse_identity(mnt)
        own_net = os.stat("/proc/self/ns/net").st_ino
        initial = sorted(initial_netns_inodes([own_net]))
        spec: holder.HolderSpec = {"mnt": mnt, "dev": ident.dev, "initial_net": initial,
                                   "binds": [list(b) for b in binds], "_test_keep": list(_test_keep)}
        status_r, status_w = os.pipe()
        go_r, go_w = os.pipe()
        life_r, life_w = os.pipe()
        os.set_inheritable(life_w, False)
        argv = [sys.executable, "-c", holder.ENTRY, str(status_w), str(go_r), str(life_r), json.dumps(spec)]
        proc = subprocess.Popen(argv, pass_fds=(status_w, go_r, life_r), stdin=subprocess.DEVNULL,
                                env=env_with_package(os.environ), cwd="/", start_new_session=True)
        os.close(status_w)
        os.close(go_r)
        os.close(life_r)
        reader = _LineReader(status_r)
        holder_pid = None
        try:
            deadline = time.monotonic() + timeout
            msg = reader.next(deadline)
            if msg.get("state") != "userns":
                raise _holder_error("sandbox holder failed", msg)
            # identity map of every uid/gid: root in the sandbox is root's uid, with
            # capabilities only inside the sandbox's namespaces
            for name, text in (("uid_map", "0 0 4294967295\n"), ("setgroups", "allow\n"),
                               ("gid_map", "0 0 4294967295\n")):
                try:
                    with open(f"/proc/{proc.pid}/{name}", "w") as f:
                        f.write(text)
                except OSError as e:
                    raise SandboxError(f"writing /proc/PID/{name} of the sandbox holder: "
                                       f"[Errno {e.errno}] {e.strerror}", e.errno) from None
            os.write(go_w, b"mapped\n")
            ready = None
            while ready is None:
                msg = reader.next(deadline)
                if msg.get("state") == "forked":
                    holder_pid = msg["pid"]
                elif msg.get("state") == "ready":
                    ready = msg
                else:
                    raise _holder_error("sandbox holder failed", msg)
            if holder_pid is None:
                raise SandboxError("sandbox holder did not report its pid")
            sb = cls(mnt=mnt, holder=holder_pid, middle=proc, dev=ident.dev, netns=ready["netns"],
                     userns=ready["userns"], mntns=ready["mntns"], initial_net=initial,
                     overlays=ready["overlays"], life_w=life_w, state_file=state_file)
            try:
                sb.verify()
            except BaseException:
                sb.stop()
                raise
            if state_file:
                sb.write_state(state_file)
            log.info("sandbox for %s: holder pid %d, net:[%d]", mnt, holder_pid, sb.netns)
            return sb
        except BaseException:
            _kill_wait(proc, holder_pid)
            os.close(life_w)
            raise
        finally:
            os.close(go_w)
            reader.close()

    # -- state file (for `memfs exec` and friends in other processes) ---------

    def to_dict(self) -> dict[str, object]:
        return {"mnt": self.mnt, "holder": self.holder, "dev": self.dev, "netns": self.netns,
                "userns": self.userns, "mntns": self.mntns, "initial_net": self.initial_net,
                "overlays": self.overlays, "starttime": _proc_starttime(self.holder), "started": self.started}

    def write_state(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(self.to_dict(), f)
        os.replace(tmp, path)
        self.state_file = path

    @classmethod
    def from_state(cls, path: str) -> Sandbox:
        """A handle on a sandbox that another process (the daemon) holds; SandboxError with
        the daemon's own reason if it has none."""
        require_root()
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise SandboxError(f"no sandbox state at {path}") from None
        if "error" in d:
            raise SandboxError(f"no sandbox for {d.get('mnt', path)}: {d['error']}", d.get("errno"))
        sb = cls(mnt=d["mnt"], holder=d["holder"], middle=None, dev=d["dev"], netns=d["netns"],
                 userns=d["userns"], mntns=d["mntns"], initial_net=d["initial_net"], overlays=d["overlays"],
                 state_file=path, started=d.get("started", 0.0))
        if _proc_starttime(sb.holder) != d.get("starttime"):
            raise SandboxError(f"the sandbox of {sb.mnt} is gone (holder pid {sb.holder} is not running)")
        return sb

    # -- checks ----------------------------------------------------------------

    def alive(self) -> bool:
        return not self._closed and ns_ino(f"/proc/{self.holder}/ns/net") == self.netns

    def verify(self) -> None:
        """Check from outside: holder alive, its namespaces ours, overlays this memfs mount."""
        if self._closed:
            raise SandboxError(f"the sandbox of {self.mnt} has been stopped")
        net = ns_ino(f"/proc/{self.holder}/ns/net")
        if net is None:
            raise SandboxError(f"the sandbox of {self.mnt} is gone (holder pid {self.holder} is not running)")
        check_netns(net, self.initial_net, expected=self.netns, where=f"sandbox holder {self.holder}")
        if ns_ino(f"/proc/{self.holder}/ns/user") != self.userns or ns_ino(f"/proc/{self.holder}/ns/mnt") != self.mntns:
            raise SandboxError(f"refusing: pid {self.holder} is no longer the sandbox holder of {self.mnt}")
        check_overlays(read_mountinfo(f"/proc/{self.holder}/mountinfo"), self.dev, self.overlays)

    def expectations(self) -> Expectations:
        return {"dev": self.dev, "netns": self.netns, "initial_net": self.initial_net,
                "overlays": self.overlays}

    # -- running commands ----------------------------------------------------------

    def command(self, argv: Sequence[str], *, cwd: str | None = None, detach: bool = False,
                unshare_mounts: enter.PrivateMounts | None = None) -> list[str]:
        """The argv that runs ``argv`` inside the sandbox (after the safety checks)."""
        self.verify()
        if not argv:
            raise SandboxError("no command given")
        opts: enter.EnterOptions = {"holder": self.holder, "expect": self.expectations(),
                                    "cwd": cwd or _cwd(), "detach": detach, "mounts": unshare_mounts}
        return [sys.executable, "-c", enter.ENTRY, json.dumps(opts), "--", *argv]

    def popen(self, argv: Sequence[str], *, cwd: str | None = None, env: dict[str, str] | None = None,
              **kw: object) -> subprocess.Popen:
        e = env_with_package(os.environ if env is None else env)
        e.setdefault("SYSTEMD_DEVICE_VERIFY_SYSFS", "0")
        return subprocess.Popen(self.command(argv, cwd=cwd), env=e, **kw)

    def run(self, argv: Sequence[str], *, timeout: float = 60.0, check: bool = False, text: bool = True,
            input: str | bytes | None = None, env: dict[str, str] | None = None, cwd: str | None = None,
            capture_output: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` in the sandbox and wait (bounded by ``timeout``)."""
        kw: dict[str, object] = {"text": text}
        if capture_output:
            kw.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        kw["stdin"] = subprocess.PIPE if input is not None else subprocess.DEVNULL
        p = self.popen(argv, cwd=cwd, env=env, **kw)
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()   # the command dies with it (PR_SET_PDEATHSIG)
            out, err = p.communicate()
            raise subprocess.TimeoutExpired(list(argv), timeout, out, err) from None
        cp = subprocess.CompletedProcess(list(argv), p.returncode, out, err)
        if check:
            cp.check_returncode()
        return cp

    @contextlib.contextmanager
    def in_netns(self) -> Iterator[None]:
        """Put the *calling thread* into the sandbox's network namespace (sockets made
        meanwhile belong to it), and back afterwards."""
        self.verify()
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        target = os.open(f"/proc/{self.holder}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(target, CLONE_NEWNET)
            try:
                check_netns(os.stat("/proc/thread-self/ns/net").st_ino, self.initial_net,
                            expected=self.netns, where="this thread")
                yield
            finally:
                setns(own, CLONE_NEWNET)
        finally:
            os.close(own)
            os.close(target)

    def uevent_socket(self) -> socket.socket:
        """A NETLINK_KOBJECT_UEVENT socket in the sandbox's network namespace (checked)."""
        with self.in_netns():
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT)
        try:
            nsfd = fcntl.ioctl(s.fileno(), SIOCGSKNS)
            try:
                check_netns(os.fstat(nsfd).st_ino, self.initial_net, expected=self.netns,
                            where="the uevent socket")
            finally:
                os.close(nsfd)
        except BaseException:
            s.close()
            raise
        return s

    # -- teardown ------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Kill everything in the sandbox (its pid 1 first) and release the namespaces."""
        if self._closed:
            return
        self._closed = True
        if self.life_w is not None:
            with contextlib.suppress(OSError):
                os.close(self.life_w)
            self.life_w = None
        if self.middle is not None:
            _kill_wait(self.middle, self.holder, timeout)
        else:
            # a handle from a state file: only signal the holder if it still is ours
            if ns_ino(f"/proc/{self.holder}/ns/net") == self.netns:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.holder, signal.SIGKILL)
        if self.state_file:
            with contextlib.suppress(OSError):
                os.unlink(self.state_file)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def write_no_sandbox(path: str, mnt: str, reason: str, errno: int | None = None) -> None:
    """Record at ``path`` (where a sandbox would record itself) why ``mnt`` has none, for
    ``memfs exec`` and friends to say so."""
    tmp = path + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump({"mnt": mnt, "error": reason, "errno": errno}, f)
    os.replace(tmp, path)


def _holder_error(what: str, msg: dict[str, object]) -> SandboxError:
    err = msg.get("errno")
    return SandboxError(f"{what}: {msg.get('error', msg)}", err if isinstance(err, int) else None)


def state_paths(mnt: str | os.PathLike[str]) -> list[str]:
    """Where a daemon-held sandbox of ``mnt`` records itself (next to the control socket)."""
    return [p[:-len(".sock")] + ".sandbox" for p in control.socket_candidates(mnt)]


def open_sandbox(mnt: str | os.PathLike[str]) -> Sandbox:
    """The sandbox that the memfs daemon serving ``mnt`` holds (SandboxError if none)."""
    require_root()
    real = os.path.realpath(os.fspath(mnt))
    fuse_identity(real)
    for path in state_paths(real):
        if os.path.exists(path):
            sb = Sandbox.from_state(path)
            sb.verify()
            return sb
    raise SandboxError(f"no sandbox for {real}: the daemon serving it has not recorded one (it "
                       f"is still starting it, or it is an older memfs); see memfs status {real}")


def _kill_wait(proc: subprocess.Popen, holder_pid: int | None, timeout: float = 10.0) -> None:
    """SIGKILL the sandbox's pid 1 (the kernel then kills every process of the pid
    namespace), then reap the middle process that we started."""
    if holder_pid is None and proc.poll() is None:
        proc.kill()   # still setting up (no pid namespace yet): nothing else to kill
    if holder_pid is not None and proc.poll() is None:
        # the holder is the middle process's child: make sure the pid is still it
        if _parent_of(holder_pid) == proc.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(holder_pid, signal.SIGKILL)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _stat_field(pid: int, index: int) -> int | None:
    """Field ``index`` (counted after the command name) of /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[index])
    except (OSError, ValueError, IndexError):
        return None


def _parent_of(pid: int) -> int | None:
    return _stat_field(pid, 1)


def _proc_starttime(pid: int) -> int | None:
    return _stat_field(pid, 19)


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:
        return "/"


def package_parent() -> str:
    """The directory that holds the memfs package (put on PYTHONPATH of the trampolines)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def env_with_package(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with this memfs first on PYTHONPATH: the trampolines import it."""
    e = dict(env)
    e["PYTHONPATH"] = package_parent() + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


class _LineReader:
    """JSON lines from the holder's status pipe, each awaited until a deadline."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def next(self, deadline: float) -> dict[str, object]:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SandboxError("timed out waiting for the sandbox holder")
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise SandboxError("the sandbox holder exited during setup")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
