"""The fusepy adapter (memfs.fuse) mounted for real, exercised with real programs.

A toy kernfs tree is served by a forked daemon (tests/support/fuse.py).  Its
state (what store() received, the alive flag) is observed and driven through
control attributes of the mount itself: `_log`, `_kill`, `_names_calls`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from memfs.sysfs.kernfs import Attr, Dir, DynDir, Link, Tree, attr_ro, attr_rw, attr_wo
from tests.support.fuse import (
    Mount,
    errno_of,
    fuse_unavailable,
    mount_options,
    mounted,
    run,
)

_WHY = fuse_unavailable()
pytestmark = [
    pytest.mark.skipif(_WHY is not None, reason=_WHY or ""),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (allow_other, setpriv)"),
]

N_MANY = 10_000


class Toy:
    """State and tree of the toy filesystem (lives in the daemon process)."""

    def __init__(self) -> None:
        self.values = {"a": "initial\n"}
        self.log: list[tuple[str, bytes]] = []
        self.alive = True
        self.names_calls = 0
        self.counter = 0

    def _logger(self, name: str):
        def store(buf: bytes) -> None:
            self.log.append((name, buf))
        return store

    def _store_a(self, buf: bytes) -> None:
        self.log.append(("a", buf))
        self.values["a"] = buf.decode()

    def _store_einval(self, buf: bytes) -> None:
        self.log.append(("einval", buf))
        raise OSError(errno.EINVAL, "invalid value")

    def _store_buggy(self, buf: bytes) -> None:
        self.log.append(("buggy", buf))
        raise ValueError("a bug in a store callback")

    def _kill(self, buf: bytes) -> None:
        self.alive = buf.strip() != b"0"

    def _counter(self) -> str:
        self.counter += 1
        return f"{self.counter:08d}" + "-" * 40 + "\n"

    def _boom(self) -> str:
        raise RuntimeError("boom: a bug in a show callback")

    def _enxio(self) -> str:
        raise OSError(errno.ENXIO, "no such device or address")

    def _slow(self) -> str:
        time.sleep(0.5)
        return "slow\n"

    def _names(self) -> Iterator[str]:
        self.names_calls += 1
        return (f"memory{i}" for i in range(N_MANY))

    def _lookup(self, name: str) -> Dir | None:
        if not name.startswith("memory") or not name[6:].isdigit():
            return None
        i = int(name[6:])
        if i >= N_MANY or name != f"memory{i}":
            return None
        return Dir({"state": attr_ro(lambda: "online\n"),
                    "index": attr_ro(lambda: f"{i}\n")})

    def tree(self) -> Tree:
        hello = attr_ro(lambda: "hello\n")
        return Tree(Dir({"sys": Dir({
            "a": attr_rw(lambda: self.values["a"], self._store_a),
            "ro": hello,
            "wo": attr_wo(self._logger("wo")),
            "einval": attr_rw(lambda: "0\n", self._store_einval),
            "buggy": attr_rw(lambda: "0\n", self._store_buggy),
            "mortal": attr_rw(lambda: "alive\n", self._logger("mortal"),
                              alive=lambda: self.alive),
            "nostore": Attr(lambda: "rw bits, no store\n", None, 0o644),
            "counter": attr_ro(self._counter),
            "boom": attr_ro(self._boom),
            "enxio": attr_ro(self._enxio),
            "slow": attr_ro(self._slow),
            "node0": Dir({"meminfo": hello}),
            "link": Link("node0"),
            "dynlink": Link(lambda: f"many/memory{len(self.log)}"),
            "many": DynDir(self._names, self._lookup),
            # control attributes
            "_log": attr_ro(lambda: json.dumps([[n, b.hex()] for n, b in self.log])),
            "_kill": attr_wo(self._kill),
            "_names_calls": attr_ro(lambda: f"{self.names_calls}\n"),
        })}))


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Mount]:
    with mounted(lambda: Toy().tree(), tmp_path) as m:
        yield m


def stores(m: Mount) -> list[tuple[str, bytes]]:
    return [(n, bytes.fromhex(h)) for n, h in json.loads((m / "sys/_log").read_text())]


def sh(cmd: str, *, cwd: Path, as_nobody: bool = False):
    return run(["sh", "-c", f"cd '{cwd}' && {cmd}"], as_nobody=as_nobody)


# --------------------------------------------------------------------------
# mount and metadata


def test_mounted_with_expected_options(mnt: Mount) -> None:
    fstype, opts = mount_options(mnt) or ("", "")
    assert fstype == "fuse.memfs"
    for opt in ("default_permissions", "allow_other", "user_id=0"):
        assert opt in opts.split(",")


def test_stat_of_attrs_dirs_links(mnt: Mount) -> None:
    for name, mode in (("a", 0o644), ("ro", 0o444), ("wo", 0o200)):
        st = os.stat(mnt / "sys" / name)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == mode
        assert st.st_size == 4096  # like sysfs, whatever the content
        assert (st.st_uid, st.st_gid, st.st_nlink) == (0, 0, 1)
    st = os.stat(mnt / "sys/many")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
    assert st.st_nlink == 2
    st = os.lstat(mnt / "sys/link")
    assert stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o777
    assert st.st_size == len("node0")
    st1, st2 = os.stat(mnt / "sys/a"), os.stat(mnt / "sys/ro")
    assert st1.st_mtime_ns == st2.st_mtime_ns  # fixed timestamps


def test_readdir_has_dot_entries_and_dtype(mnt: Mount) -> None:
    names = os.listdir(mnt / "sys")
    assert names[:4] == ["a", "ro", "wo", "einval"]
    dtypes = _read_dtypes(mnt / "sys")
    assert dtypes["."] == dtypes[".."] == DT_DIR
    assert dtypes["a"] == dtypes["ro"] == DT_REG
    assert dtypes["node0"] == dtypes["many"] == DT_DIR
    assert dtypes["link"] == DT_LNK
    # os.scandir answers from d_type (no stat needed)
    kinds = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink(),
                      e.is_file(follow_symlinks=False)) for e in os.scandir(mnt / "sys")}
    assert kinds["node0"] == (True, False, False)
    assert kinds["link"] == (False, True, False)
    assert kinds["a"] == (False, False, True)


def test_readlink_and_following(mnt: Mount) -> None:
    assert os.readlink(mnt / "sys/link") == "node0"
    assert (mnt / "sys/link/meminfo").read_text() == "hello\n"
    assert os.path.realpath(mnt / "sys/link") == str(mnt / "sys/node0")
    # callable target, evaluated on each readlink
    assert os.readlink(mnt / "sys/dynlink") == "many/memory0"
    (mnt / "sys/wo").write_text("x")
    assert os.readlink(mnt / "sys/dynlink") == "many/memory1"
    assert (mnt / "sys/dynlink/index").read_text() == "1\n"
    assert errno_of(lambda: os.readlink(mnt / "sys/a")) == errno.EINVAL


def test_dyndir_10000_entries(mnt: Mount) -> None:
    names = os.listdir(mnt / "sys/many")
    assert len(names) == N_MANY
    assert names[:2] == ["memory0", "memory1"] and names[-1] == f"memory{N_MANY - 1}"
    assert (mnt / "sys/_names_calls").read_text() == "1\n"
    # lookups of single entries never list the directory
    assert (mnt / f"sys/many/memory{N_MANY - 1}/index").read_text() == f"{N_MANY - 1}\n"
    os.stat(mnt / "sys/many/memory5000/state")
    assert errno_of(lambda: os.stat(mnt / f"sys/many/memory{N_MANY}")) == errno.ENOENT
    assert errno_of(lambda: os.stat(mnt / "sys/many/memory05")) == errno.ENOENT
    assert (mnt / "sys/_names_calls").read_text() == "1\n"


def test_enoent_and_enametoolong(mnt: Mount) -> None:
    assert errno_of(lambda: os.stat(mnt / "sys/nope")) == errno.ENOENT
    assert errno_of(lambda: os.stat(mnt / "sys" / ("x" * 256))) == errno.ENAMETOOLONG
    assert errno_of(lambda: os.stat(mnt / "sys" / ("x" * 255))) == errno.ENOENT


def test_statfs(mnt: Mount) -> None:
    sv = os.statvfs(mnt)
    assert sv.f_bsize == 4096 and sv.f_blocks == 0 and sv.f_files == 0
    assert sv.f_namemax == 255


# --------------------------------------------------------------------------
# reading


def test_read_text(mnt: Mount) -> None:
    assert (mnt / "sys/ro").read_text() == "hello\n"
    assert (mnt / "sys/a").read_text() == "initial\n"
    r = run(["cat", str(mnt / "sys/ro"), str(mnt / "sys/node0/meminfo")])
    assert r.returncode == 0 and r.stdout == "hello\nhello\n"


def test_no_page_cache_every_open_calls_show(mnt: Mount) -> None:
    seen = [(mnt / "sys/counter").read_text()[:8] for _ in range(3)]
    assert seen == ["00000001", "00000002", "00000003"]
    (mnt / "sys/a").write_text("changed\n")
    assert (mnt / "sys/a").read_text() == "changed\n"


def test_reads_in_pieces_are_one_consistent_snapshot(mnt: Mount) -> None:
    fd = os.open(mnt / "sys/counter", os.O_RDONLY)
    try:
        pieces = []
        while chunk := os.read(fd, 3):
            pieces.append(chunk)
        data = b"".join(pieces)
        assert all(len(p) == 3 for p in pieces[:-1])
        # one show() at open: counter 1, content intact across 17 reads
        assert data == b"00000001" + b"-" * 40 + b"\n"
        assert os.read(fd, 3) == b""  # EOF stays EOF
        # rewinding and re-reading from offset 0 regenerates the snapshot
        os.lseek(fd, 0, os.SEEK_SET)
        assert os.read(fd, 8) == b"00000002"
        assert os.pread(fd, 8, 0) == b"00000003"
        assert os.pread(fd, 5, 3) == b"00003"  # non-zero offset: same snapshot
    finally:
        os.close(fd)


def test_read_show_oserror_propagates_at_open(mnt: Mount) -> None:
    assert errno_of(lambda: os.open(mnt / "sys/enxio", os.O_RDONLY)) == errno.ENXIO


def test_unexpected_exception_is_eio_without_traceback(mnt: Mount) -> None:
    assert errno_of(lambda: (mnt / "sys/boom").read_text()) == errno.EIO
    fd = os.open(mnt / "sys/buggy", os.O_WRONLY)
    try:
        # (not Path.write_text: CPython retries a failed flush at dealloc)
        assert errno_of(lambda: os.write(fd, b"1")) == errno.EIO
    finally:
        os.close(fd)
    assert stores(mnt) == [("buggy", b"1")]
    assert (mnt / "sys/ro").read_text() == "hello\n"  # daemon still fine
    log = mnt.log()
    assert "boom: a bug in a show callback" in log
    assert "a bug in a store callback" in log
    assert "Traceback" not in log


def test_multithreaded_daemon(mnt: Mount) -> None:
    # show() of `slow` sleeps 0.5 s; two concurrent opens overlap.
    results: list[str] = []

    def reader() -> None:
        results.append((mnt / "sys/slow").read_text())

    t0 = time.monotonic()
    threads = [threading.Thread(target=reader) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    elapsed = time.monotonic() - t0
    assert results == ["slow\n"] * 3
    assert elapsed < 1.2, f"3 x 0.5 s shows took {elapsed:.2f}s: not concurrent"


# --------------------------------------------------------------------------
# writing


def test_shell_echo_stores(mnt: Mount) -> None:
    r = sh("echo 42 > sys/a", cwd=mnt.path)
    assert r.returncode == 0, r.stderr
    assert stores(mnt) == [("a", b"42\n")]  # O_TRUNC did not store anything
    assert (mnt / "sys/a").read_text() == "42\n"


def test_shell_echo_einval_message(mnt: Mount) -> None:
    # bash's builtin echo and coreutils echo report the errno...
    r = run(["bash", "-c", f"echo bad > '{mnt}/sys/einval'"])
    assert r.returncode != 0 and "Invalid argument" in r.stderr, r.stderr
    r = sh("/bin/echo bad > sys/einval", cwd=mnt.path)
    assert r.returncode != 0 and "Invalid argument" in r.stderr, r.stderr
    # ...dash's builtin echo says "I/O error" for any failed write (dash quirk,
    # same on the real sysfs), but still fails.
    r = sh("echo bad > sys/einval", cwd=mnt.path)
    assert r.returncode != 0, r.stderr
    assert stores(mnt) == [("einval", b"bad\n")] * 3


def test_shell_echo_to_readonly_is_permission_denied(mnt: Mount) -> None:
    for name in ("ro", "nostore"):
        r = sh(f"echo 1 > sys/{name}", cwd=mnt.path)
        assert r.returncode != 0
        assert "Permission denied" in r.stderr
    assert stores(mnt) == []


def test_open_wronly_without_trunc(mnt: Mount) -> None:
    fd = os.open(mnt / "sys/a", os.O_WRONLY)
    try:
        assert os.write(fd, b"online_movable") == 14
    finally:
        os.close(fd)
    assert stores(mnt) == [("a", b"online_movable")]


def test_each_write_is_one_whole_store_regardless_of_offset(mnt: Mount) -> None:
    fd = os.open(mnt / "sys/wo", os.O_WRONLY)
    try:
        assert os.write(fd, b"1234567") == 7
        assert os.write(fd, b"xyz") == 3  # file offset is now 7
        assert os.pwrite(fd, b"abc", 100) == 3
        assert os.pwrite(fd, b"def", 0) == 3
    finally:
        os.close(fd)
    assert stores(mnt) == [("wo", b"1234567"), ("wo", b"xyz"), ("wo", b"abc"), ("wo", b"def")]


def test_zero_length_write_does_not_store(mnt: Mount) -> None:
    fd = os.open(mnt / "sys/wo", os.O_WRONLY)
    try:
        assert os.write(fd, b"") == 0
    finally:
        os.close(fd)
    assert stores(mnt) == []


def test_large_write_returns_full_length_stores_first_4096(mnt: Mount) -> None:
    payload = bytes(range(256)) * 40  # 10240 bytes
    fd = os.open(mnt / "sys/wo", os.O_WRONLY)
    try:
        assert os.write(fd, payload) == len(payload)
    finally:
        os.close(fd)
    assert stores(mnt) == [("wo", payload[:4096])]


def test_write_oserror_errno_propagates(mnt: Mount) -> None:
    fd = os.open(mnt / "sys/einval", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as ei:
            os.write(fd, b"nope")
        assert ei.value.errno == errno.EINVAL
    finally:
        os.close(fd)


def test_truncate_is_a_noop(mnt: Mount) -> None:
    os.truncate(mnt / "sys/a", 0)
    fd = os.open(mnt / "sys/a", os.O_WRONLY | os.O_TRUNC)
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    assert (mnt / "sys/a").read_text() == "initial\n"
    assert stores(mnt) == []


def test_open_access_checks_apply_to_root(mnt: Mount) -> None:
    for name in ("ro", "nostore"):
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
            assert errno_of(lambda: os.open(mnt / "sys" / name, flags)) == errno.EACCES
    for flags in (os.O_RDONLY, os.O_RDWR):
        assert errno_of(lambda: os.open(mnt / "sys/wo", flags)) == errno.EACCES
    assert errno_of(lambda: (mnt / "sys/wo").read_text()) == errno.EACCES
    # rw attr: every access mode is fine
    for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
        os.close(os.open(mnt / "sys/a", flags))


def test_enodev_on_open_handle_after_object_removed(mnt: Mount) -> None:
    fd = os.open(mnt / "sys/mortal", os.O_RDWR)
    try:
        assert os.pread(fd, 100, 0) == b"alive\n"
        assert os.write(fd, b"1") == 1
        (mnt / "sys/_kill").write_text("0")
        assert errno_of(lambda: os.pread(fd, 100, 0)) == errno.ENODEV
        assert errno_of(lambda: os.pread(fd, 100, 3)) == errno.ENODEV
        assert errno_of(lambda: os.write(fd, b"2")) == errno.ENODEV
        assert stat.S_ISREG(os.fstat(fd).st_mode)  # fstat still works
        assert errno_of(lambda: os.open(mnt / "sys/mortal", os.O_RDONLY)) == errno.ENODEV
    finally:
        os.close(fd)
    assert stores(mnt) == [("mortal", b"1")]


def test_namespace_is_immutable(mnt: Mount) -> None:
    s = mnt / "sys"
    assert errno_of(lambda: os.open(s / "new", os.O_WRONLY | os.O_CREAT, 0o644)) == errno.EACCES
    r = sh("echo 1 > sys/new", cwd=mnt.path)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert errno_of(lambda: os.mkdir(s / "newdir")) == errno.EPERM
    assert errno_of(lambda: os.unlink(s / "a")) == errno.EPERM
    assert errno_of(lambda: os.rmdir(s / "node0")) == errno.EPERM
    assert errno_of(lambda: os.rename(s / "a", s / "b")) == errno.EPERM
    assert errno_of(lambda: os.chmod(s / "a", 0o600)) == errno.EPERM
    assert errno_of(lambda: os.chown(s / "a", 1, 1)) == errno.EPERM
    assert errno_of(lambda: os.symlink("a", s / "sl")) == errno.EPERM
    assert errno_of(lambda: os.link(s / "a", s / "hl")) == errno.EPERM
    assert errno_of(lambda: os.mkfifo(s / "fifo")) == errno.EPERM
    os.utime(s / "a")  # succeeds, no-op
    assert os.listdir(s)[:4] == ["a", "ro", "wo", "einval"]


# --------------------------------------------------------------------------
# other users


def test_non_root_reads_but_cannot_write(tmp_path: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv missing")
    with mounted(lambda: Toy().tree(), tmp_path, public=True) as m:
        r = run(["cat", str(m / "sys/ro"), str(m / "sys/a")], as_nobody=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout == "hello\ninitial\n"
        r = run(["sh", "-c", f"echo 1 > '{m}/sys/a'"], as_nobody=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr
        r = run(["sh", "-c", f"cat '{m}/sys/wo'"], as_nobody=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr
        r = run(["id", "-u"], as_nobody=True)
        assert r.stdout.strip() == "65534"
        py = shutil.which("python3", path="/usr/bin:/bin")
        if py:
            code = ("import os,sys\n"
                    "try:\n os.open(sys.argv[1], os.O_WRONLY)\nexcept OSError as e: print(e.errno)\n")
            r = run([py, "-c", code, str(m / "sys/a")], as_nobody=True)
            assert r.stdout.strip() == str(errno.EACCES), r.stderr
        assert stores(m) == []


def test_thread_mode_helper(tmp_path: Path) -> None:
    toy = Toy()
    with mounted(toy.tree(), tmp_path, mode="thread") as m:
        (m / "sys/a").write_text("7")
        assert toy.log == [("a", b"7")]  # model observable in-process
        assert (m / "sys/a").read_text() == "7"
    assert not os.path.ismount(tmp_path / "mnt")


def test_watchdog_unblocks_a_hung_daemon(tmp_path: Path) -> None:
    # show() blocks forever; the watchdog kills the daemon, which aborts the
    # FUSE connection: the stuck open() fails instead of hanging the run.
    def tree() -> Tree:
        return Tree(Dir({"hang": attr_ro(lambda: threading.Event().wait() and "")}))

    with mounted(tree, tmp_path, watchdog=1.5) as m:
        t0 = time.monotonic()
        err = errno_of(lambda: (m / "hang").read_text())
        assert err in (errno.ENOTCONN, errno.ECONNABORTED), err
        assert time.monotonic() - t0 < 10
    assert not os.path.ismount(tmp_path / "mnt")


def test_teardown_unmounts(tmp_path: Path) -> None:
    with mounted(lambda: Toy().tree(), tmp_path) as m:
        assert os.path.ismount(m.path)
        pid = m.pid
    assert not os.path.ismount(tmp_path / "mnt")
    assert pid is not None
    assert errno_of(lambda: os.kill(pid, 0)) == errno.ESRCH


# --------------------------------------------------------------------------
# d_type straight from getdents (os.scandir hides it)

DT_DIR, DT_REG, DT_LNK = 4, 8, 10


class _Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


def _read_dtypes(path: Path) -> dict[str, int]:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir.restype = ctypes.POINTER(_Dirent)
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.closedir.argtypes = [ctypes.c_void_p]
    d = libc.opendir(os.fsencode(path))
    assert d, os.strerror(ctypes.get_errno())
    out: dict[str, int] = {}
    try:
        while True:
            ent = libc.readdir(d)
            if not ent:
                break
            out[ent.contents.d_name.decode()] = ent.contents.d_type
    finally:
        libc.closedir(d)
    return out
