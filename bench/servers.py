"""Daemons the benchmark mounts (each runs in its own process, in the foreground).

``python -m bench.servers memfs MNT --blocks N [--no-inc-epoch] [--direct]``
    memfs itself: a bench machine of N blocks (:mod:`bench.machines`), its sysfs
    tree, served by :func:`memfs.fuse.serve` wired to the model exactly as the
    daemon does (watch_machine, the model lock): the page-cache fast path
    (`memfs mount --page-cache`), or with ``--direct`` the daemon's default.
``python -m bench.servers minimal MNT --file REL/PATH --text TEXT``
    the floor of the binding: a fusepy filesystem serving one constant file at
    REL/PATH (its parent directories exist, nothing else), with memfs's mount
    options and the same design (OPEN answered ENOSYS, entries and pages cached,
    st_size the text's length), with as little Python work per upcall as possible.
"""
from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
import time

import fuse as fusepy

from bench.machines import bench_machine
from memfs.fuse import ENTRY_TIMEOUT, Invalidator, mount_operations, serve
from memfs.sysfs.changes import watch_machine
from memfs.sysfs.tree import build_tree


def serve_memfs(mnt: str, blocks: int, epoch: bool | None, page_cache: bool) -> None:
    m = bench_machine(blocks)

    def watch(inv: Invalidator) -> None:
        watch_machine(m, inv)

    serve(build_tree(m), mnt, watch=watch, lock=m.lock, epoch=epoch, page_cache=page_cache)


def serve_minimal(mnt: str, rel: str, text: str) -> None:
    data = text.encode()
    parts = [p for p in rel.split("/") if p]
    file_path = "/" + "/".join(parts)
    dirs = {"/"} | {"/" + "/".join(parts[:i]) for i in range(1, len(parts))}
    now = time.time_ns()
    base = {"st_uid": 0, "st_gid": 0, "st_atime": now, "st_mtime": now, "st_ctime": now}
    dir_st = dict(base, st_mode=stat.S_IFDIR | 0o755, st_nlink=2, st_size=0)
    file_st = dict(base, st_mode=stat.S_IFREG | 0o644, st_nlink=1, st_size=len(data))
    enoent = fusepy.FuseOSError(errno.ENOENT)
    enosys = fusepy.FuseOSError(errno.ENOSYS)

    class Minimal(fusepy.Operations):
        use_ns = True

        def __call__(self, op: str, *args: object) -> object:  # memfs's dispatch shape, no try
            return getattr(self, op)(*args)

        def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
            if path == file_path:
                return file_st
            if path in dirs:
                return dir_st
            raise enoent

        def open(self, path: str, flags: int) -> int:
            raise enosys  # the same fast path as memfs: no OPEN/FLUSH/RELEASE

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return data[offset:offset + size]

        def write(self, path: str, buf: bytes, offset: int, fh: int) -> int:
            return len(buf)

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            return 0

        # the same operations table as memfs's adapter (nothing else registered)
        flush = fsync = fsyncdir = opendir = releasedir = access = bmap = ioctl = lock = None

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", ".."]

    mount_operations(Minimal(), mnt, entry_timeout=ENTRY_TIMEOUT, negative_timeout=ENTRY_TIMEOUT)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.servers")
    ap.add_argument("kind", choices=("memfs", "minimal"))
    ap.add_argument("mountpoint")
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--no-inc-epoch", dest="epoch", action="store_false", default=None,
                    help="memfs: drop entries by FUSE_NOTIFY_INVAL_ENTRY (the path of kernels < 6.16)")
    ap.add_argument("--direct", dest="page_cache", action="store_false",
                    help="memfs: serve texts directly (OPEN per access), as `memfs mount` does by default")
    ap.add_argument("--file", default="sys/devices/system/memory/memory0/state")
    ap.add_argument("--text", default="online\n")
    a = ap.parse_args(argv)
    if not os.path.realpath(a.mountpoint).startswith("/tmp/"):
        print("bench servers mount only under /tmp", file=sys.stderr)
        return 2
    if a.kind == "memfs":
        serve_memfs(a.mountpoint, a.blocks, a.epoch, a.page_cache)
    else:
        serve_minimal(a.mountpoint, a.file, a.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
