"""memfs mounts for tests: start a daemon on a fresh directory, drive it, tear it down.

:func:`memfs_mounted` starts ``python -m memfs mount`` on a fresh 0755 directory under
/tmp (so other users can reach it) and yields a :class:`MemfsMount`; whatever happens it
is torn down: ``memfs umount``, then ``fusermount -u -z`` and SIGKILL of the daemon it
started if that did not work. A watchdog (default 300 s) kills a daemon that outlives its
test, so a hung mount fails the test instead of hanging the run. The ``memfs_mount``
fixture (memfs.pytest_plugin) is a factory of these.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from memfs import control
from memfs.cli import pid_gone as _pid_gone
from memfs.control import ControlClient
from memfs.daemon import lazy_unmount
from memfs.mountinfo import FSTYPE, mounts_at

CLI_TIMEOUT = 60.0


def fuse_unavailable() -> str | None:
    """Why memfs cannot be mounted here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse missing"
    if shutil.which("fusermount") is None:
        return "fusermount missing (apt-get install fuse)"
    try:
        import fuse  # noqa: F401  (fusepy: loads libfuse.so.2; imported here to catch its error)
    except (ImportError, OSError, EnvironmentError) as e:
        return f"fusepy/libfuse unusable: {e}"
    return None


def memfs_cli(*args: str, timeout: float = CLI_TIMEOUT, env: dict[str, str] | None = None,
              prefix: Sequence[str] = (), python: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m memfs ARGS`` with a hard time bound."""
    argv = [*prefix, python or sys.executable, "-m", "memfs", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def mount_log(mnt: str | os.PathLike[str]) -> str:
    """The daemon log of the memfs at ``mnt`` (its run directory's ``.log``), or ""."""
    for d in control.run_dirs():
        p = control.paths_in(d, mnt)["log"]
        if os.path.exists(p):
            return Path(p).read_text(errors="replace")
    return ""


class MemfsMount:
    """A running memfs: ``path`` (the sysroot), ``pid`` of its daemon, helpers to drive it."""

    def __init__(self, path: Path, pid: int, mount_output: str) -> None:
        self.path = path
        self.pid = pid
        self.mount_output = mount_output
        self._watchdog: threading.Timer | None = None

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    def __str__(self) -> str:
        return os.fspath(self.path)

    @property
    def memory(self) -> Path:
        """MNT/sys/devices/system/memory"""
        return self.path / "sys/devices/system/memory"

    def cli(self, command: str, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """``memfs COMMAND MNT ARGS...``"""
        return memfs_cli(command, os.fspath(self.path), *args, timeout=timeout)

    def client(self) -> ControlClient:
        return ControlClient(self.path, timeout=CLI_TIMEOUT)

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """One control op; raises memfs.control.ControlError on an error reply."""
        with self.client() as c:
            return c.call(op, **fields)

    def status(self) -> dict[str, Any]:
        return self.call("status")["status"]

    def log(self) -> str:
        return mount_log(self.path)

    def alive(self) -> bool:
        return not _pid_gone(self.pid)

    def kill(self) -> None:
        """SIGKILL the daemon (it is ours): leaves a dead mount behind."""
        if not _pid_gone(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _pid_gone(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)


def _cleanup(path: Path, pid: int | None) -> None:
    with contextlib.suppress(Exception):
        memfs_cli("umount", os.fspath(path), timeout=30)
    for _ in range(8):
        if FSTYPE not in mounts_at(path):
            break
        with contextlib.suppress(Exception):
            lazy_unmount(os.fspath(path))
    if pid is not None and not _pid_gone(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _pid_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    key = control.mount_key(path)
    for d in control.run_dirs():  # <key>.sock/.lock/.log and whatever else the daemon kept there
        for p in glob.glob(os.path.join(glob.escape(d), key + ".*")):
            with contextlib.suppress(OSError):
                os.unlink(p)


@contextlib.contextmanager
def memfs_mounted(config: str | os.PathLike[str] | None = None, kernel: str | None = None,
                  sets: dict[str, Any] | None = None, extra: Sequence[str] = (),
                  watchdog: float | None = 300.0) -> Iterator[MemfsMount]:
    """Mount a memfs on a fresh /tmp directory for the duration of the block."""
    base = tempfile.mkdtemp(prefix="memfs-test-", dir="/tmp")
    os.chmod(base, 0o755)
    path = Path(base) / "mnt"
    path.mkdir()
    args = ["mount", os.fspath(path)]
    if config is not None:
        args += ["--config", os.fspath(config)]
    if kernel is not None:
        args += ["--kernel", kernel]
    for k, v in (sets or {}).items():
        args += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    args += list(extra)
    pid: int | None = None
    m: MemfsMount | None = None
    try:
        r = memfs_cli(*args)
        if r.returncode != 0:
            raise RuntimeError(f"memfs mount failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")
        with ControlClient(path, timeout=30) as c:
            pid = c.call("ping")["pid"]
        m = MemfsMount(path, pid, r.stdout)
        if watchdog:
            def fire() -> None:
                sys.stderr.write(f"memfs pytest plugin: watchdog fired after {watchdog}s; "
                                 f"killing memfs daemon {pid}\n")
                _cleanup(path, pid)
            m._watchdog = threading.Timer(watchdog, fire)
            m._watchdog.daemon = True
            m._watchdog.start()
        yield m
    finally:
        if m is not None and m._watchdog is not None:
            m._watchdog.cancel()
        _cleanup(path, pid)
        shutil.rmtree(base, ignore_errors=True)

