"""SysfsOperations called directly (no mount): handle table, errno mapping."""

from __future__ import annotations

import errno
import logging
import os
import stat

import pytest
from fuse import FuseOSError

from memfs.fuse import SysfsOperations
from memfs.sysfs.kernfs import Dir, Link, Tree, attr_ro, attr_rw, attr_wo


@pytest.fixture
def ops() -> SysfsOperations:
    seq = iter(range(1, 1000))
    stored: list[bytes] = []

    def bad_store(buf: bytes) -> None:
        raise OSError(errno.EBUSY, "busy")

    def crash() -> str:
        raise KeyError("oops")

    def no_errno() -> str:
        raise OSError("no errno")

    tree = Tree(Dir({"sys": Dir({
        "seq": attr_ro(lambda: f"{next(seq)}\n"),
        "rw": attr_rw(lambda: "v\n", stored.append),
        "wo": attr_wo(bad_store),
        "crash": attr_ro(crash),
        "noerrno": attr_ro(no_errno),
        "l": Link("seq"),
    })}))
    o = SysfsOperations(tree)
    o.stored = stored  # type: ignore[attr-defined]
    return o


def call_errno(ops: SysfsOperations, op: str, *args: object) -> int | None:
    try:
        ops(op, *args)
    except FuseOSError as e:
        return e.errno
    return None


def test_release_frees_handle(ops: SysfsOperations) -> None:
    fh = ops("open", "/sys/rw", os.O_RDWR)
    assert fh in ops._handles
    ops("release", "/sys/rw", fh)
    assert ops._handles == {}
    assert call_errno(ops, "read", "/sys/rw", 10, 0, fh) == errno.EBADF


def test_distinct_handles_and_snapshot_regeneration(ops: SysfsOperations) -> None:
    f1 = ops("open", "/sys/seq", os.O_RDONLY)
    f2 = ops("open", "/sys/seq", os.O_RDONLY)
    assert f1 != f2
    assert ops("read", "/sys/seq", 100, 0, f1) == b"1\n"
    assert ops("read", "/sys/seq", 100, 0, f2) == b"2\n"
    assert ops("read", "/sys/seq", 100, 2, f1) == b""
    assert ops("read", "/sys/seq", 100, 0, f1) == b"3\n"  # re-read at 0: fresh
    assert ops("read", "/sys/seq", 1, 1, f1) == b"\n"


def test_first_read_at_zero_uses_open_snapshot(ops: SysfsOperations) -> None:
    fh = ops("open", "/sys/seq", os.O_RDONLY)  # show() -> "1"
    assert ops("read", "/sys/seq", 1, 0, fh) == b"1"
    assert ops("read", "/sys/seq", 1, 1, fh) == b"\n"


def test_write_semantics(ops: SysfsOperations) -> None:
    fh = ops("open", "/sys/rw", os.O_WRONLY)
    assert ops("write", "/sys/rw", b"", 0, fh) == 0
    assert ops("write", "/sys/rw", b"x" * 5000, 9, fh) == 5000
    assert ops.stored == [b"x" * 4096]  # type: ignore[attr-defined]
    fw = ops("open", "/sys/wo", os.O_WRONLY)
    assert call_errno(ops, "write", "/sys/wo", b"1", 0, fw) == errno.EBUSY


def test_errno_mapping(ops: SysfsOperations, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="memfs.fuse"):
        assert call_errno(ops, "open", "/sys/crash", os.O_RDONLY) == errno.EIO
        assert call_errno(ops, "open", "/sys/noerrno", os.O_RDONLY) == errno.EIO
    assert "KeyError" in caplog.text
    assert call_errno(ops, "getattr", "/nope") == errno.ENOENT
    assert call_errno(ops, "open", "/sys/seq", os.O_WRONLY) == errno.EACCES
    assert call_errno(ops, "open", "/sys/wo", os.O_RDONLY) == errno.EACCES
    assert call_errno(ops, "readlink", "/sys/seq") == errno.EINVAL
    assert call_errno(ops, "create", "/sys/new", 0o644) == errno.EACCES
    assert call_errno(ops, "mkdir", "/sys/d", 0o755) == errno.EPERM
    assert call_errno(ops, "no_such_op", "/") == errno.ENOSYS


def test_getattr_and_readdir(ops: SysfsOperations) -> None:
    st = ops("getattr", "/sys/seq")
    assert st["st_mode"] == stat.S_IFREG | 0o444 and st["st_size"] == 4096
    st = ops("getattr", "/sys/l")
    assert st["st_mode"] == stat.S_IFLNK | 0o777 and st["st_size"] == 3
    ents = list(ops("readdir", "/sys", 0))
    assert [e[0] for e in ents] == [".", "..", "seq", "rw", "wo", "crash", "noerrno", "l"]
    assert all(off == 0 for _, _, off in ents)
    assert stat.S_ISLNK(ents[-1][1]["st_mode"]) and stat.S_ISREG(ents[2][1]["st_mode"])
    assert stat.S_ISDIR(ents[0][1]["st_mode"])
    assert call_errno(ops, "readdir", "/sys/seq", 0) == errno.ENOTDIR


def test_ready_called_once_from_init() -> None:
    calls = []
    o = SysfsOperations(Tree({}), ready=lambda: calls.append(1))
    o("init", "/")
    o("init", "/")
    assert calls == [1]
