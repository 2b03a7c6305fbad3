"""The holder: the process tree that creates the sandbox's namespaces and keeps them alive.

``Sandbox.start`` runs :func:`main` in a new Python process (the *middle* process):
it unshares a user namespace (the parent writes the uid/gid maps), then mount, pid and
network namespaces, and forks pid 1 of the new pid namespace, which sets up the mounts
(:func:`setup`) and then only reaps orphans until it is told to end (:func:`serve`).
Progress goes back to the parent as JSON lines on a status pipe.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
from types import FrameType
from typing import TypedDict

from ..mountinfo import read_mountinfo
from .checks import SandboxError, check_netns, check_overlays
from .libc import (CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUSER, MS_BIND, MS_NODEV,
                   MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, make_readonly, mount, unshare)

#: (source relative to MNT, target, required) - the overlays, in binding order
OVERLAYS: tuple[tuple[str, str, bool], ...] = (
    ("sys/devices/system/memory", "/sys/devices/system/memory", True),
    ("sys/devices/system/node", "/sys/devices/system/node", True),
    ("sys/bus/memory", "/sys/bus/memory", True),
    ("sys/bus/node", "/sys/bus/node", False),                           # nodeN/subsystem's target
    ("sys/module/memory_hotplug", "/sys/module/memory_hotplug", False),  # if the machine has it
    ("sys/devices/LNXSYSTM:00", "/sys/devices/LNXSYSTM:00", False),     # ACPI memory devices
    ("sys/bus/acpi", "/sys/bus/acpi", False),                           # (firmware_node links)
    ("proc/meminfo", "/proc/meminfo", True),
    ("proc/zoneinfo", "/proc/zoneinfo", True),
    ("proc/vmstat", "/proc/vmstat", True),
)

#: device nodes the sandbox's /dev gets (bound from the host's)
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")


class HolderSpec(TypedDict):
    mnt: str                  # the memfs mount (real path)
    dev: str                  # its device, "major:minor"
    initial_net: list[int]    # inodes that mean "the host's network namespace"
    binds: list[list[str]]    # [source, target]: extra binds under the private /run
    _test_keep: list[str]     # namespaces NOT to unshare (tests of the refusals only)


class HolderInfo(TypedDict):
    overlays: list[list[str]]
    netns: int
    userns: int
    mntns: int


def _write_line(fd: int, obj: dict[str, object]) -> None:
    os.write(fd, (json.dumps(obj) + "\n").encode())


def _write_error(fd: int, e: OSError | SandboxError) -> None:
    _write_line(fd, {"state": "error", "error": str(e), "errno": e.errno})


def setup(spec: HolderSpec) -> HolderInfo:
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


def run_middle(status_fd: int, go_fd: int, life_fd: int, spec: HolderSpec) -> int:
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
        _write_error(status_fd, e)
        return 1
    pid = os.fork()
    if pid == 0:  # pid 1 of the sandbox
        code = 1
        try:
            try:
                info = setup(spec)
            except (OSError, SandboxError) as e:
                _write_error(status_fd, e)
                os._exit(1)
            _write_line(status_fd, {"state": "ready", **info})
            os.close(status_fd)
            code = serve(life_fd)
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


def serve(life_fd: int) -> int:
    """pid 1: reap orphans; end (taking the whole pid namespace along) on SIGTERM or when
    the creating process goes away (the lifeline pipe reaches EOF)."""
    stop = False

    def on_term(signum: int, frame: FrameType | None) -> None:
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


#: what Sandbox.start runs (``python -c ENTRY STATUS_FD GO_FD LIFE_FD SPEC``); the module
#: name in its command line is how tests find live holders
ENTRY = "import sys; from memfs.sandbox.holder import main; sys.exit(main())"


def main() -> int:
    status_fd, go_fd, life_fd = (int(x) for x in sys.argv[1:4])
    spec: HolderSpec = json.loads(sys.argv[4])
    return run_middle(status_fd, go_fd, life_fd, spec)
