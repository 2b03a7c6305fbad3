"""The memfs daemon: one Machine, its sysfs Tree mounted with FUSE, and a control socket.

``python -m memfs.daemon MNT [--config F] [--kernel V] [--set K=V]... [--ready-fd N]``
runs in the foreground until the mount goes away: ``memfs umount``, the control op
``shutdown``, SIGTERM/SIGINT/SIGHUP (libfuse's handlers end the loop and unmount), or
``fusermount -u``. ``memfs mount`` starts it in the background and waits on the
readiness pipe (``--ready-fd``): the daemon writes ``ready PID`` once the kernel has
completed the FUSE handshake, or ``error CODE MESSAGE``. With $NOTIFY_SOCKET set
(systemd Type=notify) it also sends READY=1.

Before mounting, the daemon takes an flock on ``<run dir>/<key>.lock`` (so two daemons
never serve one mount point), removes a dead memfs mount left at MNT (its daemon was
killed: statfs fails with ENOTCONN), and refuses a live mount or any other filesystem
there: it never stacks mounts.

With ``--state FILE`` (memfs.persist) the machine is restored from FILE, or FILE is
created, after the lock is taken and before anything is mounted: a corrupt or foreign file
(exit 1) or one made for another description (exit 2) is refused and nothing is mounted.
Every change is then saved to FILE before it is acknowledged (if it cannot be, the daemon
stops at once, exit 74), and FILE is compacted at a clean exit.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any

from . import control
from .mountinfo import FSTYPE, mounts_at
from .sandbox.cli import add_daemon_arguments

if TYPE_CHECKING:
    from .persist import StateFile

log = logging.getLogger("memfs.daemon")

#: never mount over these (memfs must not hide the real sysfs/procfs)
FORBIDDEN = ("/", "/sys", "/proc", "/dev", "/run", "/boot", "/etc", "/usr", "/bin", "/sbin", "/lib")


class MountError(Exception):
    """Why MNT cannot be used (exit code 1)."""


# ---------------------------------------------------------------------- mount table

def probe(path: str, timeout: float = 5.0) -> str:
    """"alive" if the filesystem at ``path`` answers, "dead" if its FUSE connection is gone
    (ENOTCONN), "hung" if it does not answer in time.

    statfs(2), not stat(2): the kernel may answer stat from its attribute cache even after
    the daemon died, but always asks the daemon for statfs.
    """
    result: list[str] = []

    def body() -> None:
        try:
            os.statvfs(path)
            result.append("alive")
        except OSError as e:
            result.append("dead" if e.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.ENODEV)
                          else "alive")

    t = threading.Thread(target=body, daemon=True, name="memfs-probe")
    t.start()
    t.join(timeout)
    return result[0] if result else "hung"


def lazy_unmount(path: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fusermount", "-u", "-z", path], capture_output=True, text=True,
                          timeout=timeout, check=False)


def prepare_mountpoint(mnt: str) -> None:
    """Make ``mnt`` an empty directory with nothing mounted on it, or raise MountError."""
    if mnt in FORBIDDEN or any(mnt.startswith(p + "/") for p in ("/sys", "/proc", "/dev")):
        raise MountError(f"refusing to mount over {mnt}: memfs mounts only on a directory of its own "
                         f"(e.g. ./mnt or /run/memfs/NAME)")
    for _ in range(8):
        types = mounts_at(mnt)
        if not types:
            break
        top = types[-1]
        if top != FSTYPE:
            raise MountError(f"{mnt} is already a mount point ({top}); memfs never stacks a mount "
                             f"on another: choose an empty directory")
        state = probe(mnt)
        if state == "alive":
            raise MountError(f"{mnt} is already mounted (a live memfs); memfs umount {mnt} first")
        if state == "hung":
            raise MountError(f"{mnt} is a memfs mount that does not answer; memfs umount {mnt} first")
        log.warning("removing the dead memfs mount at %s (its daemon is gone)", mnt)
        r = lazy_unmount(mnt)
        if r.returncode != 0:
            raise MountError(f"cannot remove the dead memfs mount at {mnt}: {r.stderr.strip()}")
    else:
        raise MountError(f"{mnt}: too many stacked dead mounts; clean up with fusermount -u -z {mnt}")
    try:
        os.makedirs(mnt, exist_ok=True)
        entries = os.listdir(mnt)
    except NotADirectoryError:
        raise MountError(f"{mnt} is not a directory") from None
    except OSError as e:
        raise MountError(f"cannot use {mnt}: {e.strerror}") from None
    if entries:
        raise MountError(f"{mnt} is not empty; memfs mounts on an empty directory")


# ---------------------------------------------------------------------- readiness

def sd_notify(state: str) -> bool:
    """Send ``state`` to $NOTIFY_SOCKET (systemd's sd_notify protocol); False if unset/failed."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as e:
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False


class Readiness:
    """The pipe back to `memfs mount`: one line, "ready PID" or "error CODE MESSAGE"."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self.ready = False

    def _send(self, line: str) -> None:
        with self.lock:
            if self.fd is None:
                return
            try:
                os.write(self.fd, (line.replace("\n", " ") + "\n").encode())
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None

    def ok(self) -> None:
        self.ready = True
        self._send(f"ready {os.getpid()}")

    def error(self, code: int, message: str) -> None:
        self._send(f"error {code} {message}")


# ---------------------------------------------------------------------- the daemon

def take_lock(path: str, mnt: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").split()[0]
        except (OSError, IndexError):
            holder = "?"
        os.close(fd)
        raise MountError(f"{mnt} is already mounted (memfs daemon pid {holder}); "
                         f"memfs umount {mnt} first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {mnt}\n".encode(), 0)
    return fd


def run(mnt: str, *, config: str | None = None, kernel: str | None = None,
        sets: list[str] | None = None, state: str | None = None, control_mode: int = control.DEFAULT_MODE,
        ready_fd: int | None = None, debug: bool = False, sandbox: str = "auto",
        uevent_helper: str | None = None, inc_epoch: bool = True, page_cache: bool = False) -> int:
    """Serve one machine at ``mnt`` until unmounted; returns the exit code."""
    from .machine.config import ConfigError, load_config, parse_sets

    ready = Readiness(ready_fd)
    mnt = os.path.realpath(mnt)
    server: control.ControlServer | None = None
    lock_fd: int | None = None
    state_file: "StateFile | None" = None  # with --state
    try:
        try:
            cfg = load_config(config, overrides=parse_sets(sets or []), kernel=kernel)
        except (ConfigError, OSError) as e:
            msg = str(e) if isinstance(e, ConfigError) else f"cannot read {config}: {e.strerror}"
            ready.error(2, msg)
            log.error("%s", msg)
            return 2
        # imported here, not at the top: the `memfs` command imports this module for its
        # mount helpers, and the model, FUSE and the sandbox cost it 50-100 ms (memfs/cli.py)
        from .fuse import Invalidator, serve
        from .machine.hotplug import Machine
        from .sysfs.changes import watch_machine
        from .sysfs.tree import build_tree

        paths = control.paths_in(control.choose_run_dir(), mnt)
        lock_fd = take_lock(paths["lock"], mnt)
        if state:  # restore (or create) before mounting: a bad file never gets a mount
            from .persist import DescriptionMismatch, StateError, StateFile
            try:
                state_file = StateFile.open(state, cfg)
            except (StateError, ConfigError) as e:  # ConfigError: a [[state]] entry cannot be applied
                code = 2 if isinstance(e, (DescriptionMismatch, ConfigError)) else 1
                ready.error(code, str(e))
                log.error("%s", e)
                return code
            machine = state_file.machine
            state = state_file.path
        else:
            try:
                machine = Machine(cfg)
            except ConfigError as e:  # a [[state]] entry the machine refuses (memory hotplug says why)
                ready.error(2, str(e))
                log.error("%s", e)
                return 2
        tree = build_tree(machine)
        prepare_mountpoint(mnt)
        info: dict[str, Any] = {"mountpoint": mnt, "pid": os.getpid(), "control_socket": paths["sock"],
                                "config": os.path.realpath(config) if config else None, "state_file": state}
        handler = control.Handler(machine, info, on_shutdown=lambda: os.kill(os.getpid(), signal.SIGTERM),
                                  state=state_file)
        server = control.ControlServer(handler, paths["sock"], control_mode)
        server.bind()
        # sandbox hook (memfs/sandbox/service.py): namespaces + uevent delivery, started once FUSE serves
        from .sandbox.service import DaemonSandbox
        sandbox_hook = DaemonSandbox(machine, mnt, paths["sock"], mode=sandbox, uevent_helper=uevent_helper)
        handler.info["sandbox"] = sandbox_hook.status   # memfs status shows it (updated in place)
        # Only the main thread may take SIGTERM/SIGINT/SIGHUP: libfuse's handler must
        # interrupt the main loop's wait (its worker threads block every signal).
        stop = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        try:
            server.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.chdir("/")
    except MountError as e:
        ready.error(1, str(e))
        log.error("%s", e)
        return 1
    except OSError as e:
        ready.error(1, f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
        log.error("%s", e)
        return 1
    finally:
        if server is None:
            if state_file is not None:
                state_file.close(compact=False)
            if lock_fd is not None:
                os.close(lock_fd)

    def announce() -> None:
        ready.ok()
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving {mnt}")
        log.info("serving %s (pid %d, control socket %s)", mnt, os.getpid(), paths["sock"])

    def on_ready() -> None:
        # the sandbox stats the mount: start it off the FUSE thread, then announce
        def start_sandbox() -> None:
            if sandbox_hook.start():
                announce()
            else:
                ready.error(1, f"{sandbox_hook.error}")
                os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=start_sandbox, name="memfs-sandbox-start", daemon=True).start()

    def watch(inv: Invalidator) -> None:
        # every change of the machine drops the kernel's cached copies of what it
        # altered; a control op drops them before it is answered
        watch_machine(machine, inv)
        handler.around_op = inv.collect

    code = 0
    try:
        serve(tree, mnt, ready=on_ready, debug=debug, watch=watch, lock=machine.lock,
              epoch=None if inc_epoch else False, page_cache=page_cache)
    except RuntimeError as e:
        code = 1
        if not ready.ready:
            ready.error(1, f"the FUSE mount at {mnt} failed (libfuse: {e}); see {paths['log']}")
        log.error("FUSE loop ended with an error: %s", e)
    finally:
        sd_notify("STOPPING=1")
        sandbox_hook.close()
        server.close()
        if state_file is not None:
            state_file.close(compact=True)  # later changes (none should come) fail ESHUTDOWN
        os.close(lock_fd)
        log.info("stopped serving %s", mnt)
    if not ready.ready:
        ready.error(1, f"the FUSE mount at {mnt} ended before it was ready; see {paths['log']}")
        return code or 1
    return code


def parse_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0600 or 0666") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r}: a mode is between 000 and 777")
    return mode


def setup_logging(debug: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s memfs[%(process)d] %(levelname)s %(message)s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m memfs.daemon",
                                description="Serve one memfs machine at MNT in the foreground "
                                            "(memfs mount starts this for you).")
    p.add_argument("mountpoint")
    p.add_argument("--config")
    p.add_argument("--kernel")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--state")
    p.add_argument("--control-mode", type=parse_mode, default=control.DEFAULT_MODE)
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--debug", action="store_true")
    p.add_argument("--page-cache", action="store_true",
                   help="serve attribute texts from the kernel's page cache (the fast path, "
                        "docs/performance.md)")
    p.add_argument("--no-inc-epoch", dest="inc_epoch", action="store_false",
                   help="drop vanished entries with FUSE_NOTIFY_INVAL_ENTRY, as on kernels "
                        "before 6.16, even where FUSE_NOTIFY_INC_EPOCH exists (tests)")
    add_daemon_arguments(p)
    a = p.parse_args(argv)
    setup_logging(a.debug)
    return run(a.mountpoint, config=a.config, kernel=a.kernel, sets=a.set, state=a.state,
               control_mode=a.control_mode, ready_fd=a.ready_fd, debug=a.debug,
               sandbox=a.sandbox, uevent_helper=a.uevent_helper, inc_epoch=a.inc_epoch,
               page_cache=a.page_cache)


if __name__ == "__main__":
    sys.exit(main())
