"""Reusable helpers to mount a kernfs ``Tree`` with FUSE in tests.

Typical use::

    from tests.support.fuse import mounted, fuse_unavailable

    pytestmark = pytest.mark.skipif(bool(fuse_unavailable()), reason=fuse_unavailable() or "")

    def test_x(tmp_path):
        with mounted(make_tree, tmp_path) as m:     # or mounted(tree, tmp_path)
            assert (m / "sys/devices/system/memory/block_size_bytes").read_text()

By default the daemon runs in a forked child process ("process" mode): the
tree (or the factory, called in the child) is inherited through fork, so it
needs no pickling, and the daemon can always be killed.  State of the tree is
then only observable through the mount itself.  ``mode="thread"`` serves from
a thread of the test process instead, so the test can inspect the model
directly (but a wedged daemon thread cannot be killed).

Safety: the helper only mounts under the directory it is given (or a fresh
/tmp directory with ``public=True``), always lazily unmounts it with
``fusermount -u -z``, and only signals the child process it started.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

from memfs.sysfs.kernfs import Tree
from memfs.testing.mount import fuse_unavailable

TreeSource = Union[Tree, Callable[[], Tree]]

#: Prefix running a command as user/group nobody with no supplementary groups.
AS_NOBODY: tuple[str, ...] = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` appears as a mount point in /proc/self/mounts."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and fields[1].replace("\\040", " ") == target:
                return True
    return False


def mount_options(path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """``(fstype, options)`` of the mount at ``path`` from /proc/self/mounts."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 3 and fields[1] == target:
                return fields[2], fields[3]
    return None


def unmount(path: str | os.PathLike[str], timeout: float = 10.0) -> None:
    """Lazily unmount ``path`` if it is mounted (never raises)."""
    if not is_mountpoint(path):
        return
    try:
        subprocess.run(["fusermount", "-u", "-z", os.fspath(path)],
                       timeout=timeout, capture_output=True, check=False)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


def run(cmd: Sequence[str], *, timeout: float = 10.0, as_nobody: bool = False,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with a hard time bound, capturing text output."""
    argv = list(cmd)
    if as_nobody:
        argv = [*AS_NOBODY, *argv]
    return subprocess.run(["timeout", "-s", "KILL", str(timeout), *argv],
                          capture_output=True, text=True, timeout=timeout + 5,
                          input=input.decode() if input is not None else None)


@dataclass
class Mount:
    """A live mount; usable as a path (``m / "sys/a"``, ``os.fspath(m)``)."""

    path: Path
    log_path: Path | None = None    # daemon stderr (process mode)
    pid: int | None = None          # daemon pid (process mode)
    mode: str = "process"

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return os.fspath(self.path)

    def log(self) -> str:
        """Everything the daemon wrote to stderr so far (process mode)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")


def _child_main(source: TreeSource, mnt: str, conn: Any, log_path: str | None,
                serve_kwargs: dict[str, Any]) -> None:
    """Body of the forked daemon process."""
    if log_path is not None:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
    # Fresh logging config: the child must not reuse pytest's capture handlers.
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        from memfs.fuse import serve
        tree = source() if callable(source) else source
        serve(tree, mnt, ready=lambda: conn.send("ready"), **serve_kwargs)
    except BaseException as e:  # report why we could not serve
        try:
            conn.send(f"error: {type(e).__name__}: {e}")
        except Exception:
            pass
        raise


@contextlib.contextmanager
def mounted(
    source: TreeSource,
    tmp_path: str | os.PathLike[str],
    *,
    mode: str = "process",
    public: bool = False,
    timeout: float = 15.0,
    watchdog: float | None = 120.0,
    **serve_kwargs: Any,
) -> Iterator[Mount]:
    """Mount a tree (or a factory returning one) and yield a :class:`Mount`.

    * ``tmp_path``: the mount point is ``tmp_path/mnt``, and the daemon log
      ``tmp_path/memfs-daemon.log``.  With ``public=True`` the mount point is
      instead a fresh 0755 directory under /tmp (so that other users can
      reach it: pytest's tmp_path lives under a 0700 directory); it is
      removed afterwards.
    * ``timeout``: seconds to wait for the daemon to be ready.
    * ``watchdog`` (process mode): after this many seconds, the daemon is
      killed and the mount lazily detached, which makes any syscall stuck on
      the mount fail (ENOTCONN) instead of hanging the test run.
    * extra keyword arguments go to :func:`memfs.fuse.serve`.

    Teardown always unmounts (``fusermount -u -z``) and reaps the daemon.
    """
    if mode not in ("process", "thread"):
        raise ValueError(f"mode must be 'process' or 'thread', not {mode!r}")
    tmp = Path(tmp_path)
    created_public: str | None = None
    if public:
        created_public = tempfile.mkdtemp(prefix="memfs-mnt-", dir="/tmp")
        os.chmod(created_public, 0o755)
        mnt = Path(created_public)
    else:
        mnt = tmp / "mnt"
        mnt.mkdir(parents=True, exist_ok=True)
    try:
        if mode == "process":
            cm = _mounted_process(source, mnt, tmp / "memfs-daemon.log", timeout,
                                  watchdog, serve_kwargs)
        else:
            cm = _mounted_thread(source, mnt, timeout, serve_kwargs)
        with cm as m:
            yield m
    finally:
        unmount(mnt)
        if created_public is not None:
            with contextlib.suppress(OSError):
                os.rmdir(created_public)


@contextlib.contextmanager
def _mounted_process(source: TreeSource, mnt: Path, log_path: Path, timeout: float,
                     watchdog: float | None, serve_kwargs: dict[str, Any]) -> Iterator[Mount]:
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, name="memfs-test-daemon", daemon=True,
                       args=(source, os.fspath(mnt), child_conn, os.fspath(log_path),
                             serve_kwargs))
    proc.start()
    child_conn.close()
    timer: threading.Timer | None = None

    def stop() -> None:
        # 1) detach the mount; 2) the daemon's loop then ends on its own;
        # 3) escalate to SIGTERM/SIGKILL of *our* child only if it lingers.
        unmount(mnt)
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
            proc.join(3)
        if proc.is_alive():
            proc.kill()
            proc.join(3)
        unmount(mnt)

    try:
        deadline = time.monotonic() + timeout
        msg = None
        while time.monotonic() < deadline:
            if parent_conn.poll(0.05):
                try:
                    msg = parent_conn.recv()
                except EOFError:
                    msg = "error: daemon exited before ready"
                break
            if not proc.is_alive():
                msg = f"error: daemon exited with code {proc.exitcode} before ready"
                break
        if msg != "ready":
            raise RuntimeError(f"memfs test daemon did not become ready: {msg or 'timeout'}"
                               f"\n--- daemon log ---\n"
                               f"{log_path.read_text(errors='replace') if log_path.exists() else ''}")
        if not is_mountpoint(mnt):
            raise RuntimeError(f"ready() called but {mnt} is not a mount point")
        if watchdog:
            def fire() -> None:
                sys.stderr.write(f"tests.support.fuse: watchdog fired after {watchdog}s, "
                                 f"killing daemon {proc.pid}\n")
                if proc.is_alive():
                    proc.kill()
                unmount(mnt)
            timer = threading.Timer(watchdog, fire)
            timer.daemon = True
            timer.start()
        yield Mount(mnt, log_path, proc.pid, "process")
    finally:
        if timer is not None:
            timer.cancel()
        stop()
        parent_conn.close()


@contextlib.contextmanager
def _mounted_thread(source: TreeSource, mnt: Path, timeout: float,
                    serve_kwargs: dict[str, Any]) -> Iterator[Mount]:
    from memfs.fuse import serve

    ready = threading.Event()
    failure: list[BaseException] = []
    tree = source() if callable(source) else source

    def body() -> None:
        try:
            serve(tree, os.fspath(mnt), ready=ready.set, **serve_kwargs)
        except BaseException as e:  # pragma: no cover - reported below
            failure.append(e)
            ready.set()

    th = threading.Thread(target=body, name="memfs-test-daemon", daemon=True)
    th.start()
    try:
        if not ready.wait(timeout) or failure:
            raise RuntimeError(f"memfs thread daemon did not become ready: "
                               f"{failure[0] if failure else 'timeout'}")
        yield Mount(mnt, None, None, "thread")
    finally:
        unmount(mnt)
        th.join(10)
        if th.is_alive():  # pragma: no cover
            sys.stderr.write("tests.support.fuse: daemon thread did not exit after unmount\n")


def errno_of(fn: Callable[[], Any]) -> int | None:
    """Run ``fn`` and return the errno of the OSError it raises (None if none)."""
    try:
        fn()
    except OSError as e:
        return e.errno
    return None


__all__ = ["AS_NOBODY", "Mount", "errno_of", "fuse_unavailable", "is_mountpoint",
           "mount_options", "mounted", "run", "unmount"]
