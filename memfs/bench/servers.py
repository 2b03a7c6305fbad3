"""Daemons the benchmark mounts (each runs in its own process, in the foreground).

``python -m memfs.bench.servers memfs MNT --blocks N``
    memfs itself: a bench machine of N blocks (:mod:`memfs.bench.machines`),
    its sysfs tree, served by :func:`memfs.fuse.serve` with the default options.
``python -m memfs.bench.servers minimal MNT --file REL/PATH --text TEXT``
    the floor of the binding: a fusepy filesystem serving one constant file at
    REL/PATH (its parent directories exist, nothing else), with the same mount
    options as memfs, the same per-operation work as little as Python allows.
``python -m memfs.bench.servers memfs MNT --blocks N --binding pyfuse3-lowlevel``
    memfs on the libfuse 3 low-level prototype (:mod:`memfs.fuse_lowlevel`).
"""
from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
import time
from typing import Any, Callable


#: ``--binding`` of the libfuse 3 low-level prototype (memfs only; the floor stays fusepy)
LOWLEVEL = "pyfuse3-lowlevel"


def watch_machine(m: Any) -> Callable[[Callable[[], Any]], None]:
    """A ``serve(watch=...)`` for a Machine: every model change calls the listener."""
    return m.listeners.append


def serve_memfs(mnt: str, blocks: int, binding: str | None, opts: dict, entry_cache: bool) -> None:
    from memfs.bench.machines import bench_machine
    from memfs.fuse import serve
    from memfs.sysfs.tree import build_tree

    m = bench_machine(blocks)
    tree = build_tree(m)
    serve(tree, mnt, binding=binding, watch=watch_machine(m) if entry_cache else None, **opts)


def serve_lowlevel(mnt: str, blocks: int) -> None:
    """memfs on the libfuse 3 low-level prototype (:mod:`memfs.fuse_lowlevel`, pyfuse3)."""
    from memfs.bench.machines import bench_machine
    from memfs.fuse_lowlevel import serve
    from memfs.sysfs.tree import build_tree

    m = bench_machine(blocks)
    serve(build_tree(m), mnt, watch=watch_machine(m))


def serve_minimal(mnt: str, rel: str, text: str, binding: str | None, opts: dict) -> None:
    from memfs import fuse as memfs_fuse

    fusepy = memfs_fuse.load_binding(binding)
    data = text.encode()
    parts = [p for p in rel.split("/") if p]
    file_path = "/" + "/".join(parts)
    dirs = {"/"} | {"/" + "/".join(parts[:i]) for i in range(1, len(parts))}
    now = time.time_ns()
    base = {"st_uid": 0, "st_gid": 0, "st_atime": now, "st_mtime": now, "st_ctime": now}
    dir_st = dict(base, st_mode=stat.S_IFDIR | 0o755, st_nlink=2, st_size=0)
    file_st = dict(base, st_mode=stat.S_IFREG | 0o644, st_nlink=1, st_size=4096)
    enoent = fusepy.FuseOSError(errno.ENOENT)

    class Minimal(fusepy.Operations):
        use_ns = True

        def __call__(self, op, *args):  # the same dispatch shape as memfs, no try
            return getattr(self, op)(*args)

        def getattr(self, path, fh=None):
            if path == file_path:
                return file_st
            if path in dirs:
                return dir_st
            raise enoent

        def open(self, path, flags):
            return 1

        def read(self, path, size, offset, fh):
            return data[offset:offset + size]

        def write(self, path, buf, offset, fh):
            return len(buf)

        def truncate(self, path, length, fh=None):
            return 0

        def release(self, path, fh):
            return 0

        # the same operations table as memfs's adapter (nothing else registered)
        flush = fsync = fsyncdir = opendir = releasedir = access = bmap = ioctl = lock = None

        def readdir(self, path, fh):
            return [".", ".."]

    memfs_fuse.mount_operations(Minimal(), mnt, binding=binding, **opts)


def _opt(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        return key, True
    return key, int(value) if value.lstrip("-").isdigit() else value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memfs.bench.servers")
    ap.add_argument("kind", choices=("memfs", "minimal"))
    ap.add_argument("mountpoint")
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--file", default="sys/devices/system/memory/memory0/state")
    ap.add_argument("--text", default="online\n")
    ap.add_argument("--binding", default=None)
    ap.add_argument("--entry-cache", action="store_true",
                    help="memfs: let the kernel cache entries, invalidated on every model change")
    ap.add_argument("-o", dest="opts", action="append", default=[], metavar="KEY[=VALUE]",
                    help="extra libfuse option (overrides memfs's defaults)")
    a = ap.parse_args(argv)
    if not os.path.realpath(a.mountpoint).startswith("/tmp/"):
        print("bench servers mount only under /tmp", file=sys.stderr)
        return 2
    opts = dict(_opt(o) for o in a.opts)
    if a.kind == "memfs" and a.binding == LOWLEVEL:
        serve_lowlevel(a.mountpoint, a.blocks)
    elif a.kind == "memfs":
        serve_memfs(a.mountpoint, a.blocks, a.binding, opts, a.entry_cache)
    else:
        serve_minimal(a.mountpoint, a.file, a.text, a.binding, opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
