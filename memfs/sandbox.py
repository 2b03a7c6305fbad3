"""Run unmodified hotplug software against a memfs mount: a per-mount sandbox.

A sandbox is a set of namespaces held open by a small *holder* process:

* a **user namespace** whose uids/gids map 1:1 onto the host's (root stays uid 0, so
  file ownership is unchanged), but whose capabilities stop at the namespace: nothing
  in the sandbox can load kernel modules or mount/unmount host filesystems. It also
  owns the network namespace below, which is what keeps the host's own kernel uevents
  out: the kernel broadcasts them to every network namespace owned by the *initial*
  user namespace (lib/kobject_uevent.c, "Restrict uevents to initial user namespace"),
  so a plain ``unshare --net`` sandbox would hear every real uevent of the host;
* a **network namespace**: the only place where memfs uevents are delivered;
* a **pid namespace** (the holder is its pid 1; killing it kills everything in it) with
  its own /proc;
* a **mount namespace** (propagation private) in which
  - ``MNT/sys/devices/system/memory`` is bound over ``/sys/devices/system/memory``,
    ``.../node``, ``MNT/sys/bus/memory``, ``MNT/sys/module/memory_hotplug``, the ACPI
    memory devices (``/sys/devices/LNXSYSTM:00``, ``/sys/bus/acpi``: where the blocks'
    ``firmware_node`` links lead), and ``MNT/proc/{meminfo,zoneinfo,vmstat}`` over their /proc files.
    They are bound *from the FUSE mount*, so a dead daemon gives ENOTCONN, never the
    real files underneath;
    Those the emulated kernel lacks (e.g. memory_hotplug before 5.13) are hidden
    behind an empty read-only tmpfs, so the host's never show through;
  - the rest of /sys and /proc is **read-only** (EROFS on any write that misses an
    overlay), /dev is a small tmpfs with null, zero, full, random, urandom and tty only
    (no disks), and /run is a fresh tmpfs (own /run/udev; no host daemon sockets).

Safety checks (refuse with :class:`SandboxError` otherwise): before the holder binds
anything its network namespace must not be the initial one and each bind source must
lie on this memfs mount; after setup, and again inside the sandbox before *every*
command runs (``_enter``), each overlay target's topmost entry in
``/proc/self/mountinfo`` must be ``fuse.memfs``, source ``memfs``, with the FUSE
mount's device number and the expected root, and the network namespace must be the
sandbox's own and not the initial one. "Initial" means any of: PID 1's netns (when
readable), the netns of the process that created the sandbox, and the kernel's fixed
inode number for init_net (0xEFFFFFF9, kernels with fixed init namespace inodes).

uevents: :class:`UeventForwarder` subscribes to ``Machine.events`` and, from a thread
that has joined the sandbox's network namespace (never the host's: checked before the
socket is made, and the socket's own netns is checked with SIOCGSKNS), sends each
event to the kernel's uevent socket of that namespace (``NETLINK_KOBJECT_UEVENT``,
destination pid 0). The kernel (4.18+) rebroadcasts it to multicast group 1 *of that
namespace only*, with sender portid 0 - the only kind of message udevd, ``udevadm
monitor --kernel`` and libudev/pyudev accept as a kernel uevent (they drop multicasts
from user space). The kernel appends its own ``SEQNUM=`` from the global uevent
counter, so receivers see a kernel sequence number (increasing, in memfs order); memfs's
own number travels as ``MEMFS_SEQNUM=``. Side effect on the host: each event advances
/sys/kernel/uevent_seqnum by one, as any uevent does.

Everything here needs root.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import queue
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

log = logging.getLogger("memfs.sandbox")

FSTYPE = "fuse.memfs"
FUSE_SOURCE = "memfs"

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442   # same number on every architecture (new syscall table)
PR_SET_PDEATHSIG = 1
SIOCGSKNS = 0x894C

NETLINK_KOBJECT_UEVENT = 15
NLMSG_MIN_TYPE = 0x10
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2

#: init_net's inode on kernels with fixed init namespace inodes (proc_ns.h/nsfs.h)
INIT_NET_INO = 0xEFFFFFF9

#: (source relative to MNT, target) - the overlays, in binding order
OVERLAYS: tuple[tuple[str, str, bool], ...] = (
    ("sys/devices/system/memory", "/sys/devices/system/memory", True),
    ("sys/devices/system/node", "/sys/devices/system/node", True),
    ("sys/bus/memory", "/sys/bus/memory", True),
    ("sys/module/memory_hotplug", "/sys/module/memory_hotplug", False),  # if the machine has it
    ("sys/devices/LNXSYSTM:00", "/sys/devices/LNXSYSTM:00", False),     # ACPI memory devices
    ("sys/bus/acpi", "/sys/bus/acpi", False),                           # (firmware_node links)
    ("proc/meminfo", "/proc/meminfo", True),
    ("proc/zoneinfo", "/proc/zoneinfo", True),
    ("proc/vmstat", "/proc/vmstat", True),
)

#: device nodes the sandbox's /dev gets (bound from the host's)
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")

#: where systemd 252's udevd reads rules (conf_paths "udev/rules.d")
UDEV_RULES_DIRS = ("/etc/udev/rules.d", "/run/udev/rules.d", "/usr/local/lib/udev/rules.d",
                   "/usr/lib/udev/rules.d", "/lib/udev/rules.d")
UDEVD_CANDIDATES = ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd")


class SandboxError(Exception):
    """The sandbox cannot be made or used safely; the message says why."""


# ---------------------------------------------------------------------- libc

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
           f"mount {source or ''} on {target}")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), f"setns({nstype:#x})")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def make_readonly(path: str, recursive: bool = True) -> None:
    """Make the mount at ``path`` (and everything below it) read-only in this namespace."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    r = _libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(-100), _b(path),
                      ctypes.c_uint(AT_RECURSIVE if recursive else 0), ctypes.byref(attr),
                      ctypes.c_size_t(ctypes.sizeof(attr)))
    if r == 0:
        return
    e = ctypes.get_errno()
    if e != errno.ENOSYS:
        raise OSError(e, f"mount_setattr {path} read-only: {os.strerror(e)}")
    # pre-5.12 kernel: remount each mount under path read-only, keeping its locked flags
    for m in reversed(read_mountinfo()):
        if m.target == path or (recursive and m.target.startswith(path.rstrip("/") + "/")):
            keep = 0
            for opt, bit in (("nosuid", MS_NOSUID), ("nodev", MS_NODEV), ("noexec", MS_NOEXEC)):
                if opt in m.mount_opts:
                    keep |= bit
            mount(None, m.target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


# ---------------------------------------------------------------------- checks

def require_root(what: str = "the memfs sandbox") -> None:
    if os.geteuid() != 0:
        raise SandboxError(f"{what} needs root (it creates user, mount, network and pid namespaces "
                           f"and bind-mounts over /sys and /proc inside them); run it as root, "
                           f"e.g. with sudo")


def ns_ino(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def initial_netns_inodes(extra: Iterable[int] = ()) -> set[int]:
    """Inodes that identify the initial network namespace (or the host's)."""
    found = {INIT_NET_INO, *extra}
    pid1 = ns_ino("/proc/1/ns/net")
    if pid1 is not None:
        found.add(pid1)
    return found


def check_netns(netns: int, initial: Iterable[int], expected: int | None = None, where: str = "") -> None:
    """Refuse if ``netns`` is an initial network namespace (or not the one expected)."""
    if netns in {INIT_NET_INO, *initial}:
        raise SandboxError(f"refusing: {where or 'the sandbox'} is in the initial network namespace "
                           f"(net:[{netns}]); uevents must never be sent there")
    if expected is not None and netns != expected:
        raise SandboxError(f"refusing: {where or 'this process'} is in net:[{netns}], not the "
                           f"sandbox's network namespace net:[{expected}]")


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    dev: str          # "major:minor"
    root: str
    target: str
    mount_opts: str
    fstype: str
    source: str


def _unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    entries = []
    with open(path) as f:
        for line in f:
            pre, _, post = line.rstrip("\n").partition(" - ")
            a, b = pre.split(), post.split()
            if len(a) < 6 or len(b) < 2:
                continue
            entries.append(MountEntry(int(a[0]), int(a[1]), a[2], _unescape(a[3]), _unescape(a[4]),
                                      a[5], b[0], _unescape(b[1])))
    return entries


def top_mount(entries: list[MountEntry], target: str) -> MountEntry | None:
    """The mount that is visible at ``target`` (the last one mounted there)."""
    hits = [e for e in entries if e.target == target]
    return hits[-1] if hits else None


def fuse_identity(mnt: str) -> MountEntry:
    """The memfs mount at ``mnt`` in this mount namespace, or SandboxError."""
    real = os.path.realpath(mnt)
    top = top_mount(read_mountinfo(), real)
    if top is None:
        raise SandboxError(f"refusing: {real} is not a mount point (a plain directory?); the sandbox "
                           f"binds only a live memfs mount over /sys and /proc")
    if top.fstype != FSTYPE or top.source != FUSE_SOURCE:
        raise SandboxError(f"refusing: {real} is a {top.fstype} mount (source {top.source!r}), "
                           f"not a memfs mount ({FSTYPE}, source {FUSE_SOURCE!r})")
    return top


def check_overlays(entries: list[MountEntry], dev: str, overlays: Sequence[tuple[str, str]]) -> None:
    """Each ``(root, target)`` must show this memfs mount (fstype, source, device, root)."""
    for root, target in overlays:
        top = top_mount(entries, target)
        if top is None:
            raise SandboxError(f"refusing: {target} is not covered by the memfs overlay "
                               f"(the real file would show through)")
        bad = []
        if top.fstype != FSTYPE:
            bad.append(f"fstype {top.fstype}")
        if top.source != FUSE_SOURCE:
            bad.append(f"source {top.source!r}")
        if top.dev != dev:
            bad.append(f"device {top.dev} instead of {dev}")
        if top.root != "/" + root:
            bad.append(f"root {top.root} instead of /{root}")
        if bad:
            raise SandboxError(f"refusing: the mount at {target} is not this memfs mount "
                               f"({', '.join(bad)})")


# ---------------------------------------------------------------------- the holder (in the sandbox)

def _write_line(fd: int, obj: Any) -> None:
    os.write(fd, (json.dumps(obj) + "\n").encode())


def _holder_setup(spec: dict) -> dict:
    """Runs as pid 1 of the new pid namespace, in the new user/mount/net namespaces."""
    own_net = os.stat("/proc/self/ns/net").st_ino
    check_netns(own_net, spec["initial_net"], where="the sandbox holder")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mnt, dev = spec["mnt"], spec["dev"]
    # every bind source must lie on the memfs mount (checked before anything is bound)
    overlays, hidden = [], []
    for rel, target, required in OVERLAYS:
        src = os.path.join(mnt, rel)
        try:
            st = os.stat(src)
        except FileNotFoundError:
            if required:
                raise SandboxError(f"refusing: {src} does not exist; is {mnt} a memfs mount?") from None
            if os.path.isdir(target):
                hidden.append(target)   # the emulated kernel has none: hide the host's
            continue
        if f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}" != dev:
            raise SandboxError(f"refusing: {src} is not on the memfs mount at {mnt}")
        if not os.path.exists(target):
            if required:
                raise SandboxError(f"refusing: {target} does not exist on this host, nothing to cover")
            continue
        overlays.append((rel, target, src))
    # keep handles on the host's device nodes before /dev is replaced
    dev_fds = {}
    for name in DEV_NODES:
        with contextlib.suppress(OSError):
            dev_fds[name] = os.open(f"/dev/{name}", os.O_PATH | os.O_CLOEXEC)
    # fresh /proc for the pid namespace; the rest of /proc read-only
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # /sys read-only, recursively: a write that misses an overlay fails with EROFS
    make_readonly("/sys", recursive=True)
    # the overlays, bound from the FUSE mount (before /run is replaced: MNT may be below it)
    for rel, target, src in overlays:
        mount(src, target, None, MS_BIND)
    for target in hidden:
        mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "mode=0755,size=4k")
    # minimal /dev: no disks, no /dev/mem
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=1m")
    for name, fd in dev_fds.items():
        with open(f"/dev/{name}", "w"):
            pass
        mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, MS_BIND)
        os.close(fd)
    os.mkdir("/dev/pts")
    with contextlib.suppress(OSError):
        mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
        os.symlink("pts/ptmx", "/dev/ptmx")
    os.mkdir("/dev/shm", 0o1777)
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"/dev/{name}")
    os.symlink("/proc/self/fd", "/dev/fd")
    # private /run (own /run/udev; no sockets of host daemons) with the extra binds (the
    # memfs run directory), whose sources are opened first: /run is about to be covered
    bind_fds = [(os.open(src, os.O_PATH | os.O_CLOEXEC), dst) for src, dst in spec.get("binds", [])]
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for d in ("/run/lock", "/run/memfs"):
        os.makedirs(d, exist_ok=True)
    for fd, dst in bind_fds:
        os.makedirs(dst, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", dst, None, MS_BIND | MS_REC)
        os.close(fd)
    make_readonly("/proc", recursive=False)
    entries = read_mountinfo()
    check_overlays(entries, dev, [(rel, t) for rel, t, _ in overlays])
    check_netns(os.stat("/proc/self/ns/net").st_ino, spec["initial_net"], where="the sandbox holder")
    return {"overlays": [[rel, t] for rel, t, _ in overlays], "netns": own_net,
            "userns": os.stat("/proc/self/ns/user").st_ino, "mntns": os.stat("/proc/self/ns/mnt").st_ino}


def _holder_main(status_fd: int, go_fd: int, life_fd: int, spec: dict) -> int:
    """Middle process: new userns (mapped by the parent), new mnt/net/pid ns, fork pid 1."""
    try:
        unshare(CLONE_NEWUSER)
        _write_line(status_fd, {"state": "userns"})
        if os.read(go_fd, 16).strip() != b"mapped":
            return 1
        flags = CLONE_NEWNS | CLONE_NEWPID
        if "net" not in spec.get("_test_keep", ()):
            flags |= CLONE_NEWNET
        unshare(flags)
    except (OSError, SandboxError) as e:
        _write_line(status_fd, {"state": "error", "error": str(e)})
        return 1
    pid = os.fork()
    if pid == 0:  # pid 1 of the sandbox
        code = 1
        try:
            try:
                info = _holder_setup(spec)
            except (OSError, SandboxError) as e:
                _write_line(status_fd, {"state": "error", "error": str(e)})
                os._exit(1)
            _write_line(status_fd, {"state": "ready", **info})
            os.close(status_fd)
            code = _holder_loop(life_fd)
        finally:
            os._exit(code)
    _write_line(status_fd, {"state": "forked", "pid": pid})
    os.close(status_fd)
    signal.signal(signal.SIGTERM, lambda *a: os.kill(pid, signal.SIGKILL))
    while True:
        try:
            _, st = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(st) if os.WIFEXITED(st) else 1
        except InterruptedError:
            continue
        except ChildProcessError:
            return 1


def _holder_loop(life_fd: int) -> int:
    """pid 1: reap orphans; end (taking the whole pid namespace along) on SIGTERM or when
    the creating process goes away (the lifeline pipe reaches EOF)."""
    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    while not stop:
        try:
            r, _, _ = select.select([life_fd], [], [], 1.0)
        except InterruptedError:
            r = []
        if r and not os.read(life_fd, 64):
            break
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
    return 0


# ---------------------------------------------------------------------- the sandbox (outside)

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
              state_file: str | None = None, _test_keep: Sequence[str] = ()) -> "Sandbox":
        """Create the namespaces and overlays for the memfs mount at ``mnt``."""
        require_root()
        mnt = os.path.realpath(os.fspath(mnt))
        ident = fuse_identity(mnt)
        own_net = os.stat("/proc/self/ns/net").st_ino
        initial = sorted(initial_netns_inodes([own_net]))
        spec = {"mnt": mnt, "dev": ident.dev, "initial_net": initial, "binds": [list(b) for b in binds],
                "_test_keep": list(_test_keep)}
        status_r, status_w = os.pipe()
        go_r, go_w = os.pipe()
        life_r, life_w = os.pipe()
        os.set_inheritable(life_w, False)
        argv = [sys.executable, "-c", "import sys; from memfs.sandbox import _holder_entry; sys.exit(_holder_entry())",
                str(status_w), str(go_r), str(life_r), json.dumps(spec)]
        env = dict(os.environ)
        env["PYTHONPATH"] = _package_parent() + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.Popen(argv, pass_fds=(status_w, go_r, life_r), stdin=subprocess.DEVNULL,
                                env=env, cwd="/", start_new_session=True)
        os.close(status_w)
        os.close(go_r)
        os.close(life_r)
        reader = _LineReader(status_r)
        holder = None
        try:
            deadline = time.monotonic() + timeout
            msg = reader.next(deadline)
            if msg.get("state") != "userns":
                raise SandboxError(f"sandbox holder failed: {msg.get('error', msg)}")
            # identity map of every uid/gid: root in the sandbox is root's uid, with
            # capabilities only inside the sandbox's namespaces
            with open(f"/proc/{proc.pid}/uid_map", "w") as f:
                f.write("0 0 4294967295\n")
            with open(f"/proc/{proc.pid}/setgroups", "w") as f:
                f.write("allow\n")
            with open(f"/proc/{proc.pid}/gid_map", "w") as f:
                f.write("0 0 4294967295\n")
            os.write(go_w, b"mapped\n")
            ready = None
            while ready is None:
                msg = reader.next(deadline)
                if msg.get("state") == "forked":
                    holder = msg["pid"]
                elif msg.get("state") == "ready":
                    ready = msg
                else:
                    raise SandboxError(f"{msg.get('error', msg)}")
            if holder is None:
                raise SandboxError("sandbox holder did not report its pid")
            sb = cls(mnt=mnt, holder=holder, middle=proc, dev=ident.dev, netns=ready["netns"],
                     userns=ready["userns"], mntns=ready["mntns"], initial_net=initial,
                     overlays=ready["overlays"], life_w=life_w, state_file=state_file)
            try:
                sb.verify()
            except BaseException:
                sb.stop()
                raise
            if state_file:
                sb.write_state(state_file)
            log.info("sandbox for %s: holder pid %d, net:[%d]", mnt, holder, sb.netns)
            return sb
        except BaseException:
            _kill_wait(proc, holder)
            os.close(life_w)
            raise
        finally:
            os.close(go_w)
            reader.close()

    # -- state file (for `memfs exec` and friends in other processes) ---------

    def to_dict(self) -> dict:
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
    def from_state(cls, path: str) -> "Sandbox":
        """A handle on a sandbox that another process (the daemon) holds."""
        require_root()
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise SandboxError(f"no sandbox state at {path}") from None
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
        check_overlays(read_mountinfo(f"/proc/{self.holder}/mountinfo"), self.dev,
                       [tuple(o) for o in self.overlays])

    def expectations(self) -> dict:
        return {"dev": self.dev, "netns": self.netns, "initial_net": self.initial_net,
                "overlays": self.overlays}

    # -- running commands ----------------------------------------------------------

    def command(self, argv: Sequence[str], *, cwd: str | None = None, detach: bool = False,
                unshare_mounts: dict | None = None) -> list[str]:
        """The argv that runs ``argv`` inside the sandbox (after the safety checks)."""
        self.verify()
        if not argv:
            raise SandboxError("no command given")
        opts = {"holder": self.holder, "expect": self.expectations(), "cwd": cwd or _cwd(),
                "detach": detach, "mounts": unshare_mounts}
        return [sys.executable, "-c", "import sys; from memfs.sandbox import _enter_entry; sys.exit(_enter_entry())",
                json.dumps(opts), "--", *argv]

    def popen(self, argv: Sequence[str], *, cwd: str | None = None, env: dict | None = None,
              **kw: Any) -> subprocess.Popen:
        e = dict(os.environ if env is None else env)
        e["PYTHONPATH"] = _package_parent() + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
        e.setdefault("SYSTEMD_DEVICE_VERIFY_SYSFS", "0")
        return subprocess.Popen(self.command(argv, cwd=cwd), env=e, **kw)

    def run(self, argv: Sequence[str], *, timeout: float = 60.0, check: bool = False, text: bool = True,
            input: str | bytes | None = None, env: dict | None = None, cwd: str | None = None,
            capture_output: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` in the sandbox and wait (bounded by ``timeout``)."""
        kw: dict[str, Any] = {"text": text}
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

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _kill_wait(proc: subprocess.Popen, holder: int | None, timeout: float = 10.0) -> None:
    """SIGKILL the sandbox's pid 1 (the kernel then kills every process of the pid
    namespace), then reap the middle process that we started."""
    if holder is None and proc.poll() is None:
        proc.kill()   # still setting up (no pid namespace yet): nothing else to kill
    if holder is not None and proc.poll() is None:
        # the holder is the middle process's child: make sure the pid is still it
        if _parent_of(holder) == proc.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(holder, signal.SIGKILL)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _proc_starttime(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:
        return "/"


def _package_parent() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _LineReader:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def next(self, deadline: float) -> dict:
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


def _holder_entry() -> int:
    status_fd, go_fd, life_fd = (int(x) for x in sys.argv[1:4])
    spec = json.loads(sys.argv[4])
    return _holder_main(status_fd, go_fd, life_fd, spec)


# ---------------------------------------------------------------------- entering (trampoline)

def _enter_entry() -> int:
    """``python -c ... _enter_entry() OPTS -- CMD...``: join the holder's namespaces, check,
    fork (to be inside the pid namespace) and exec CMD; exit with CMD's status."""
    opts = json.loads(sys.argv[1])
    argv = sys.argv[3:]
    try:
        _join(opts["holder"], opts["expect"])
    except (OSError, SandboxError) as e:
        print(f"memfs sandbox: {e}", file=sys.stderr)
        return 125
    detach = opts.get("detach")
    if detach:
        r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        # now inside the pid namespace too: /proc/self is ours; check before anything runs
        try:
            check_in_sandbox(opts["expect"])
            if opts.get("mounts"):
                _private_mounts(opts["mounts"])
            with contextlib.suppress(OSError):
                os.chdir(opts.get("cwd") or "/")
        except (OSError, SandboxError) as e:
            print(f"memfs sandbox: {e}", file=sys.stderr)
            os._exit(125)
        try:
            if detach:
                os.close(r)
                os.setsid()
                if os.fork() != 0:
                    os._exit(0)
                # grandchild: reparented to the sandbox's pid 1; report our pid there
                os.write(w, f"{os.getpid()}\n".encode())
                os.close(w)
                os.dup2(2, 1)   # our stdout is the caller's pipe: detach from it
            else:
                set_pdeathsig(signal.SIGKILL)   # dies with the trampoline (timeouts)
            os.execvp(argv[0], argv)
        except OSError as e:
            print(f"memfs sandbox: cannot run {argv[0]}: {e.strerror}", file=sys.stderr)
            os._exit(127 if e.errno == errno.ENOENT else 126)
    if detach:
        os.close(w)
        inner = os.read(r, 64).decode().strip()
        os.close(r)
        os.waitpid(pid, 0)
        print(inner, flush=True)
        return 0 if inner else 1
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, lambda s, f: os.kill(pid, s))
    while True:
        try:
            _, st = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(st):
        sig = os.WTERMSIG(st)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # their disposition cannot be set
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig
    return os.waitstatus_to_exitcode(st)


def _join(holder: int, expect: dict) -> None:
    """setns into the holder's user, mount, net and pid namespaces; then the checks."""
    fds = {}
    try:
        for name in ("user", "mnt", "net", "pid"):
            fds[name] = os.open(f"/proc/{holder}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        for fd in fds.values():
            os.close(fd)
        raise SandboxError(f"the sandbox is gone (holder pid {holder} is not running)") from None
    if os.fstat(fds["net"]).st_ino != expect["netns"]:
        raise SandboxError(f"refusing: pid {holder} is not the sandbox holder any more")
    for name, flag in (("user", CLONE_NEWUSER), ("mnt", CLONE_NEWNS), ("net", CLONE_NEWNET),
                       ("pid", CLONE_NEWPID)):
        setns(fds[name], flag)
        os.close(fds[name])


def check_in_sandbox(expect: dict) -> None:
    """The checks made inside the sandbox before anything runs there."""
    check_netns(os.stat("/proc/self/ns/net").st_ino, expect["initial_net"], expected=expect["netns"],
                where="this process")
    check_overlays(read_mountinfo("/proc/self/mountinfo"), expect["dev"], [tuple(o) for o in expect["overlays"]])


def _private_mounts(spec: dict) -> None:
    """A mount namespace of the command's own inside the sandbox (e.g. for udevd's rules)."""
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    rules = spec.get("udev_rules")
    if rules is not None:
        # udevd reads rules from UDEV_RULES_DIRS and its settings from /etc/udev/udev.conf:
        # hide them all, then give it /etc/udev with a copy of the chosen rules only
        for d in UDEV_RULES_DIRS:
            if d.startswith("/etc/udev/"):
                continue
            if os.path.isdir(d) and os.path.realpath(d) == d:
                mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
                make_readonly(d, recursive=False)
        if not os.path.isdir("/etc/udev"):
            raise SandboxError("/etc/udev does not exist: is the udev package installed?")
        mount("tmpfs", "/etc/udev", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=4m")
        etc = "/etc/udev/rules.d"
        os.mkdir(etc)
        for src_dir in rules:
            for name in sorted(os.listdir(src_dir)):
                src = os.path.join(src_dir, name)
                if name.endswith(".rules") and os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(etc, name))
        with open("/etc/udev/udev.conf", "w") as f:
            f.write(spec.get("udev_conf") or "")
        make_readonly("/etc/udev", recursive=False)


# ---------------------------------------------------------------------- uevent delivery

def uevent_payload(ev: Any) -> bytes:
    """What the forwarder hands the kernel: ``netlink_bytes()`` with memfs's SEQNUM renamed
    MEMFS_SEQNUM (the kernel appends its own SEQNUM)."""
    head = f"{ev.action}@{ev.devpath}"
    parts = [head] + [f"{k}={v}" for k, v in ev.env() if k != "SEQNUM"] + [f"MEMFS_SEQNUM={ev.seqnum}"]
    return b"\0".join(p.encode() for p in parts) + b"\0"


@dataclass
class ForwarderStats:
    sent: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)   # emit -> kernel ack, seconds
    last_error: str | None = None


class UeventForwarder:
    """Deliver a Machine's uevents, in SEQNUM order, as kernel uevents of the sandbox."""

    def __init__(self, sandbox: Sandbox, events: Any, *, ack_timeout: float = 2.0) -> None:
        self.sandbox = sandbox
        self.events = events
        self.ack_timeout = ack_timeout
        self.q: queue.Queue = queue.Queue()
        self.stats = ForwarderStats()
        self._idle = threading.Condition()
        self._pending = 0
        self.sock = sandbox.uevent_socket()
        self.sock.bind((0, 0))
        self.sock.settimeout(ack_timeout)
        self._seq = 0
        self._unsubscribe = events.subscribe(self._enqueue)
        self._thread = threading.Thread(target=self._loop, name="memfs-uevent-forwarder", daemon=True)
        self._thread.start()

    def _enqueue(self, ev: Any) -> None:   # called under the hotplug lock: only queue
        with self._idle:
            self._pending += 1
        self.q.put((ev, time.monotonic()))

    def send(self, ev: Any) -> None:
        payload = uevent_payload(ev)
        self._seq += 1
        hdr = struct.pack("=IHHII", 16 + len(payload), NLMSG_MIN_TYPE, NLM_F_REQUEST | NLM_F_ACK, self._seq, 0)
        self.sock.sendto(hdr + payload, (0, 0))
        while True:
            data = self.sock.recv(4096)
            if len(data) >= 20:
                _, typ, _, seq, _, err = struct.unpack("=IHHIIi", data[:20])
                if typ == NLMSG_ERROR and seq == self._seq:
                    if err:
                        raise OSError(-err, f"kernel refused the uevent: {os.strerror(-err)}")
                    return

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                break
            ev, t0 = item
            try:
                self.send(ev)
                self.stats.sent += 1
                self.stats.latencies.append(time.monotonic() - t0)
                if len(self.stats.latencies) > 10000:
                    del self.stats.latencies[:5000]
            except (OSError, socket.timeout) as e:
                self.stats.failed += 1
                self.stats.last_error = f"{ev.action}@{ev.devpath}: {e}"
                log.warning("uevent %s@%s not delivered: %s", ev.action, ev.devpath, e)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event emitted so far has been handed to the kernel."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        self._unsubscribe()
        self.q.put(None)
        self._thread.join(5)
        self.sock.close()


class UeventHelper:
    """Like the kernel's uevent_helper: run ``prog SUBSYSTEM`` once per event, in order,
    inside the sandbox, with HOME, PATH and the event's properties as its environment.
    Unlike the kernel (which does not wait), each run finishes before the next starts."""

    def __init__(self, sandbox: Sandbox, events: Any, prog: str, *, timeout: float = 30.0) -> None:
        self.prog = prog
        self.timeout = timeout
        self.events = events
        self.q: queue.Queue = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self.failures: list[str] = []
        self.proc = sandbox.popen([sys.executable, "-c",
                                   "import sys; from memfs.sandbox import _helper_runner; sys.exit(_helper_runner())",
                                   prog, str(timeout)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._unsubscribe = events.subscribe(self._enqueue)
        self._thread = threading.Thread(target=self._loop, name="memfs-uevent-helper", daemon=True)
        self._thread.start()

    def _enqueue(self, ev: Any) -> None:
        with self._idle:
            self._pending += 1
        self.q.put(ev)

    def _loop(self) -> None:
        while True:
            ev = self.q.get()
            if ev is None:
                break
            try:
                assert self.proc.stdin is not None and self.proc.stdout is not None
                self.proc.stdin.write(json.dumps(ev.env()) + "\n")
                self.proc.stdin.flush()
                reply = self.proc.stdout.readline()
                if not reply:
                    raise OSError(errno.EPIPE, "the uevent helper runner exited")
                if reply.strip() != "0":
                    self.failures.append(f"{ev.action}@{ev.devpath}: {reply.strip()}")
            except OSError as e:
                self.failures.append(f"{ev.action}@{ev.devpath}: {e}")
                log.warning("uevent helper: %s", e)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        self._unsubscribe()
        self.q.put(None)
        self._thread.join(self.timeout + 5)
        with contextlib.suppress(OSError):
            if self.proc.stdin:
                self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _helper_runner() -> int:
    """Inside the sandbox: read one event (a JSON list of [key, value]) per line and run
    the helper for it; answer its exit status (or an error) on one line."""
    prog, timeout = sys.argv[1], float(sys.argv[2])
    for line in sys.stdin:
        env = {"HOME": "/", "PATH": "/sbin:/bin:/usr/sbin:/usr/bin"}
        pairs = json.loads(line)
        env.update({k: v for k, v in pairs})
        try:
            r = subprocess.run([prog, env.get("SUBSYSTEM", "")], env=env, stdin=subprocess.DEVNULL,
                               timeout=timeout, cwd="/")
            answer = str(r.returncode)
        except subprocess.TimeoutExpired:
            answer = f"timed out after {timeout}s"
        except OSError as e:
            answer = f"cannot run {prog}: {e.strerror}"
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------- udevd

def find_udevd() -> str | None:
    for p in UDEVD_CANDIDATES:
        if os.access(p, os.X_OK):
            return p
    return None


class Udevd:
    """A real systemd-udevd in the sandbox, reading only the given rules directories."""

    def __init__(self, sandbox: Sandbox, rules: Sequence[str | os.PathLike[str]] = (), *,
                 debug: bool = False, log_path: str | None = None, timeout: float = 20.0,
                 children_max: int = 4, event_timeout: int = 30) -> None:
        exe = find_udevd()
        if exe is None:
            raise SandboxError("systemd-udevd not found (install the udev package: apt-get install udev)")
        self.sandbox = sandbox
        self.rules = [os.path.realpath(os.fspath(r)) for r in rules]
        for r in self.rules:
            if not os.path.isdir(r):
                raise SandboxError(f"rules directory {r} does not exist")
        argv = [exe, f"--children-max={children_max}", f"--event-timeout={event_timeout}",
                "--resolve-names=never"]
        if debug:
            argv.append("--debug")
        self.log_path = log_path
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        env = dict(os.environ, SYSTEMD_DEVICE_VERIFY_SYSFS="0", SYSTEMD_LOG_TARGET="console")
        if debug:
            env["SYSTEMD_LOG_LEVEL"] = "debug"
        try:
            cmd = sandbox.command(argv, cwd="/", detach=True,
                                  unshare_mounts={"udev_rules": self.rules, "udev_conf": "udev_log=info\n"})
            env["PYTHONPATH"] = _package_parent()
            r = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=out, timeout=timeout)
        finally:
            if log_path:
                out.close()  # type: ignore[union-attr]
        if r.returncode != 0 or not r.stdout.strip().isdigit():
            raise SandboxError(f"systemd-udevd did not start (status {r.returncode})"
                               + (f"; see {log_path}" if log_path else ""))
        self.pid = int(r.stdout.strip())   # pid inside the sandbox
        deadline = time.monotonic() + timeout
        while True:
            p = sandbox.run(["udevadm", "control", "--ping", "--timeout=2"], timeout=10)
            if p.returncode == 0:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise SandboxError(f"systemd-udevd did not answer a ping: {p.stderr.strip()}"
                                   + (f"; see {log_path}" if log_path else ""))
            time.sleep(0.1)

    def settle(self, timeout: float = 30.0) -> bool:
        p = self.sandbox.run(["udevadm", "settle", f"--timeout={int(timeout)}"], timeout=timeout + 10)
        return p.returncode == 0

    def stop(self) -> None:
        if not self.sandbox.alive():
            return
        with contextlib.suppress(SandboxError, subprocess.TimeoutExpired):
            p = self.sandbox.run(["udevadm", "control", "--exit", "--timeout=5"], timeout=15)
            if p.returncode != 0:
                self.sandbox.run(["kill", "-KILL", str(self.pid)], timeout=10)


# ---------------------------------------------------------------------- everything for one mount

class Attachment:
    """Sandbox + forwarder (+ uevent helper) for one Machine served at ``mnt``; what the
    daemon and the pytest fixture hold. ``close()`` undoes everything, in order."""

    def __init__(self, machine: Any, mnt: str, *, uevent_helper: str | None = None,
                 state_file: str | None = None, binds: Sequence[tuple[str, str]] = (),
                 forward: bool = True) -> None:
        self.machine = machine
        self.sandbox = Sandbox.start(mnt, state_file=state_file, binds=binds)
        self.forwarder: UeventForwarder | None = None
        self.helper: UeventHelper | None = None
        self.udevds: list[Udevd] = []
        try:
            if forward:
                self.forwarder = UeventForwarder(self.sandbox, machine.events)
            if uevent_helper:
                self.helper = UeventHelper(self.sandbox, machine.events, uevent_helper)
        except BaseException:
            self.close()
            raise

    def udevd(self, rules: Sequence[str | os.PathLike[str]] = (), **kw: Any) -> Udevd:
        u = Udevd(self.sandbox, rules, **kw)
        self.udevds.append(u)
        return u

    def flush(self, timeout: float = 10.0) -> bool:
        ok = True
        if self.forwarder:
            ok &= self.forwarder.flush(timeout)
        if self.helper:
            ok &= self.helper.flush(timeout)
        return ok

    def close(self) -> None:
        for part in (self.helper, self.forwarder):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.close()
        self.sandbox.stop()


def state_path_for(mnt: str | os.PathLike[str]) -> list[str]:
    """Where a daemon-held sandbox of ``mnt`` records itself (next to the control socket)."""
    from . import control
    return [p[:-len(".sock")] + ".sandbox" for p in control.socket_candidates(mnt)]


def open_sandbox(mnt: str | os.PathLike[str]) -> Sandbox:
    """The sandbox that the memfs daemon serving ``mnt`` holds (SandboxError if none)."""
    require_root()
    real = os.path.realpath(os.fspath(mnt))
    fuse_identity(real)
    for path in state_path_for(real):
        if os.path.exists(path):
            sb = Sandbox.from_state(path)
            sb.verify()
            return sb
    raise SandboxError(f"no sandbox for {real}: the daemon serving it has none "
                       f"(it was mounted with --no-sandbox, or by an older memfs)")
