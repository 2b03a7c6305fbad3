"""Prototype: serve a :class:`memfs.sysfs.kernfs.Tree` through the libfuse 3 *low-level* API (pyfuse3).

Benchmark only (``scripts/bench --binding pyfuse3-lowlevel``); not the daemon's default.
Needs ``pip install pyfuse3 trio`` (built against Debian's ``libfuse3-dev``).

Design (see docs/performance.md, "Low-level prototype"):

* inodes are handed out lazily, one per (parent inode, name) the kernel looks up
  (or sees in a readdir); they are never freed (FORGET is ignored);
* the kernel caches entries and attributes (timeouts :data:`TIMEOUT`): a stat never
  changes while a path resolves to the same node; entries that stop resolving to
  the same node are invalidated (``invalidate_entry``) after every model change,
  and lookups of missing names are not cached (plain ENOENT), so new blocks appear;
* attributes are opened with ``keep_cache`` (the page cache survives open/close):
  a repeated open+read+close costs OPEN + RELEASE only, no READ; every attribute
  inode that was read since the last change is invalidated (``invalidate_inode``)
  after every model change; ``st_size`` is 4096 and the kernel shortens the file
  to the content on the short READ reply, so ``cat`` shows exactly ``show()``;
* opens for writing use ``direct_io``: one ``write(2)`` = one ``store()``, and the
  write handler waits (in a worker thread, never in the FUSE thread, never under
  the model lock) for the invalidations the store caused, so the next read sees it;
* FLUSH gets ENOSYS once (then never sent again).

pyfuse3's ``read``/``write``/``readdir`` receive only the file handle, not the inode, so
FUSE_NO_OPEN_SUPPORT (ENOSYS from OPEN/OPENDIR: fh 0 on every READ) cannot be used with
stock pyfuse3: the file handle is the inode number instead.  ``no_open=True`` (or
``MEMFS_LL_NO_OPEN=1``) is an *experiment* for a pyfuse3 patched to pass the inode
when fh is 0 (docs/performance.md): OPEN/OPENDIR answer ENOSYS, so the kernel stops
sending OPEN, RELEASE, OPENDIR and RELEASEDIR, keeps file pages and caches directory
listings (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR); writes then go through the page cache
(the written page stays locked until the WRITE reply). A first try at writes in this
mode hung (not debugged), so the experiment is READ-ONLY: writes fail with EROFS.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from typing import Any, Callable

import pyfuse3
import trio

from memfs.sysfs.kernfs import Attr, DirNode, Link, Node, Tree

log = logging.getLogger(__name__)

STORE_MAX = 4096
ATTR_SIZE = 4096
TIMEOUT = 3600.0
ROOT = pyfuse3.ROOT_INODE


def _fuse_error(e: BaseException) -> pyfuse3.FUSEError:
    if isinstance(e, OSError) and isinstance(e.errno, int) and e.errno > 0:
        return pyfuse3.FUSEError(e.errno)
    log.error("memfs-ll: unexpected %s: %s; returning EIO", type(e).__name__, e)
    return pyfuse3.FUSEError(errno.EIO)


class LowLevelOps(pyfuse3.Operations):
    def __init__(self, tree: Tree, no_open: bool = False) -> None:
        super().__init__()
        self.tree = tree
        self.no_open = no_open
        self._deferred: set[int] = set()  # inodes to invalidate after their WRITE reply
        now = time.time_ns()
        self._now = now
        # ino -> node; ino -> (parent ino, name); (parent ino, name) -> ino
        self._nodes: dict[int, Node] = {ROOT: tree.root}
        self._where: dict[int, tuple[int, bytes]] = {}
        self._inos: dict[tuple[int, bytes], int] = {}
        self._attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self._next = ROOT + 1
        self._lock = threading.Lock()  # the tables (FUSE thread vs invalidator)
        self._read: set[int] = set()  # attribute inodes whose pages may be cached
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}
        self._dir_fh = 1 << 62  # opendir handles, never equal to an inode number
        self._dir_ino: dict[int, list[tuple[bytes, int]]] = {}  # no_open: listing by inode
        # invalidation state
        self._gen = 0          # model changes seen
        self._done = 0         # model changes whose invalidations are done
        self._cond = threading.Condition()
        self._flush_lock = threading.Lock()
        self._stop = False
        self.stats = {"flushes": 0, "inval_inode": 0, "inval_entry": 0, "flush_s": 0.0}

    # -- inode table -------------------------------------------------------

    def _mkattr(self, ino: int, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        if isinstance(node, Attr):
            size = ATTR_SIZE
            if self.no_open and node.readable:
                # the exact size: a READDIRPLUS or GETATTR reporting 4096 after the kernel
                # shortened the file on a short READ would drop its cached page every time
                try:
                    text = node.show()  # type: ignore[misc]
                    size = len(text.encode() if isinstance(text, str) else text)
                except Exception:
                    pass
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | node.mode, 1, size
        elif isinstance(node, DirNode):
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o755, 2, 0
        else:
            t = node.target  # type: ignore[attr-defined]
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFLNK | 0o777, 1, len(t.encode())
        a.st_uid = a.st_gid = 0
        a.st_rdev = 0
        a.st_blksize = 4096
        a.st_blocks = 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._now
        return a

    def _entry(self, parent: int, name: bytes, node: Node) -> pyfuse3.EntryAttributes:
        key = (parent, name)
        with self._lock:
            ino = self._inos.get(key)
            if ino is not None:
                old = self._nodes[ino]
                if old is node or (isinstance(old, Link) and isinstance(node, Link)
                                   and old.target == node.target):
                    a = self._attrs.get(ino)
                    if a is None:
                        a = self._attrs[ino] = self._mkattr(ino, node)
                    return a
                self._read.discard(ino)
            ino = self._next
            self._next += 1
            self._nodes[ino] = node
            self._where[ino] = key
            self._inos[key] = ino
            a = self._attrs[ino] = self._mkattr(ino, node)
            return a

    def _node(self, ino: int) -> Node:
        node = self._nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    # -- namespace ---------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        d = self._node(parent_inode)
        if not isinstance(d, DirNode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._attrs.get(parent_inode) or self._mkattr(parent_inode, d)
        try:
            sname = name.decode("utf-8")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        try:
            node = d.lookup(sname)
        except Exception as e:
            raise _fuse_error(e) from None
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)  # not cached by the kernel (no ino 0 reply)
        return self._entry(parent_inode, name, node)

    async def forget(self, inode_list: Any) -> None:
        pass  # inodes live as long as the mount (prototype)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        a = self._attrs.get(inode)
        if a is None:
            node = self._node(inode)
            a = self._mkattr(inode, node)
            self._attrs[inode] = a
        elif isinstance(self._nodes[inode], Link):
            a = self._mkattr(inode, self._nodes[inode])
        return a

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_size and not isinstance(node, Attr):
            raise pyfuse3.FUSEError(errno.EISDIR if isinstance(node, DirNode) else errno.EINVAL)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return await self.getattr(inode, ctx)  # truncate (O_TRUNC) and utimens: no-ops

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        node = self._node(inode)
        if not isinstance(node, Link):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target.encode()

    async def opendir(self, inode: int, ctx: Any) -> int:
        if self.no_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # kernel: no OPENDIR/RELEASEDIR, listings cached
        listing = self._listing(inode)
        with self._lock:
            self._dir_fh += 1
            fh = self._dir_fh
            self._dirs[fh] = listing
        return fh

    def _listing(self, inode: int) -> list[tuple[bytes, int]]:
        node = self._node(inode)
        if not isinstance(node, DirNode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        try:
            entries = [(n.encode("utf-8", "surrogateescape"), c) for n, c in node.entries()]
        except Exception as e:
            raise _fuse_error(e) from None
        if inode not in self._attrs:
            self._attrs[inode] = self._mkattr(inode, node)
        parent = self._where.get(inode, (ROOT, b""))[0]
        if parent not in self._attrs:
            self._attrs[parent] = self._mkattr(parent, self._nodes[parent])
        listing = [(b".", inode), (b"..", parent)]  # the kernel ignores their attributes
        listing.extend((name, self._entry(inode, name, child).st_ino) for name, child in entries)
        return listing

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        listing = self._dirs.get(fh)
        if listing is None:
            if not self.no_open or fh not in self._nodes:
                raise pyfuse3.FUSEError(errno.EBADF)
            # no OPENDIR: fh is the directory's inode (patched pyfuse3); one listing per pass
            listing = self._dir_ino.get(fh) if start_id else None
            if listing is None:
                listing = self._dir_ino[fh] = self._listing(fh)
        attrs = self._attrs
        for i in range(start_id, len(listing)):
            name, ino = listing[i]
            a = attrs.get(ino)
            if a is None:
                a = attrs[ino] = self._mkattr(ino, self._nodes[ino])
            if not pyfuse3.readdir_reply(token, name, a, i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        with self._lock:
            self._dirs.pop(fh, None)

    async def statfs(self, ctx: Any) -> Any:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = s.f_files = s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- file I/O ------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if self.no_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # kernel: no OPEN/RELEASE, pages kept
        node = self._node(inode)
        if not isinstance(node, Attr):
            raise pyfuse3.FUSEError(errno.EISDIR if isinstance(node, DirNode) else errno.ELOOP)
        acc = flags & os.O_ACCMODE
        want_read = acc != os.O_WRONLY
        want_write = acc != os.O_RDONLY
        if (want_write and not node.writable) or (want_read and not node.readable):
            raise pyfuse3.FUSEError(errno.EACCES)
        if not node.is_alive():
            raise pyfuse3.FUSEError(errno.ENODEV)
        if want_write:  # writes bypass the page cache: one write(2) = one store()
            return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)
        return pyfuse3.FileInfo(fh=inode, direct_io=False, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._node(fh)
        if not isinstance(node, Attr) or not node.readable:
            raise pyfuse3.FUSEError(errno.EBADF)
        self._read.add(fh)  # before show(): a change after this point invalidates the page
        try:
            if not node.is_alive():
                raise OSError(errno.ENODEV, "gone")
            text = node.show()  # type: ignore[misc]
        except Exception as e:
            raise _fuse_error(e) from None
        data = text.encode() if isinstance(text, str) else text
        return data[off:off + size]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self._node(fh)
        if not isinstance(node, Attr) or not node.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        if self.no_open:
            raise pyfuse3.FUSEError(errno.EROFS)  # read-only experiment (see the module doc)
        n = len(buf)
        if n == 0:
            return 0
        try:
            if not node.is_alive():
                raise OSError(errno.ENODEV, "gone")
            node.store(buf[:STORE_MAX] if n > STORE_MAX else buf)  # type: ignore[misc]
        except Exception as e:
            raise _fuse_error(e) from None
        if self.no_open:  # the written page is locked until we reply: invalidate it after
            with self._cond:
                self._deferred.add(fh)
                self._gen += 1
                self._cond.notify()
            await trio.to_thread.run_sync(self.invalidate_now, fh)
        elif self._gen != self._done:  # the store changed the model: invalidate before replying
            await trio.to_thread.run_sync(self.invalidate_now)
        return n

    async def release(self, fh: int) -> None:
        pass

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: Any) -> list:
        return []

    # -- invalidation --------------------------------------------------------

    def changed(self) -> None:
        """Machine listener (runs under the model lock): only records and wakes the invalidator."""
        with self._cond:
            self._gen += 1
            self._cond.notify()

    def invalidate_now(self, skip: int = 0) -> None:
        """Do the invalidations of every change seen so far. Never call it from the FUSE
        (trio) thread, nor with the model lock held: the kernel may wait for pages locked by
        reads that the FUSE thread has to answer."""
        with self._flush_lock:
            gen = self._gen
            if gen == self._done and (skip or not self._deferred):
                return
            t = time.perf_counter()
            with self._lock:
                cached = self._read - {skip}
                self._read &= {skip}
                if not skip:
                    cached |= self._deferred
                    self._deferred.clear()
                cached |= set(self._dir_ino)  # no_open: the kernel caches these listings
                self._dir_ino.clear()
                if self.no_open:  # sizes of every attribute handed out may have changed
                    for ino, node in self._nodes.items():
                        if isinstance(node, Attr) and ino != skip:
                            cached.add(ino)
                            self._attrs.pop(ino, None)
                entries = list(self._inos.items())
                nodes = dict(self._nodes)
            stale = []
            for (parent, name), ino in entries:
                d = nodes.get(parent)
                try:
                    new = d.lookup(name.decode("utf-8", "surrogateescape")) if isinstance(d, DirNode) else None
                except Exception:
                    new = None
                old = nodes[ino]
                if new is old or (isinstance(old, Link) and isinstance(new, Link) and old.target == new.target):
                    continue
                stale.append((parent, name, ino))
            with self._lock:
                for parent, name, ino in stale:
                    if self._inos.get((parent, name)) == ino:
                        del self._inos[(parent, name)]
            ni = ne = 0
            for ino in cached:
                try:
                    pyfuse3.invalidate_inode(ino)
                    ni += 1
                except OSError:
                    pass  # ENOENT: the kernel has forgotten it
            for parent, name, ino in stale:
                try:
                    pyfuse3.invalidate_entry(parent, name)
                    ne += 1
                except OSError:
                    pass
            if not skip:
                self._done = gen
            s = self.stats
            s["flushes"] += 1
            s["inval_inode"] += ni
            s["inval_entry"] += ne
            s["flush_s"] += time.perf_counter() - t

    def _invalidator(self) -> None:
        while True:
            with self._cond:
                while self._gen == self._done and not self._deferred and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
            try:
                self.invalidate_now()
            except Exception:
                log.exception("memfs-ll: invalidation failed")

    def start_invalidator(self) -> threading.Thread:
        t = threading.Thread(target=self._invalidator, name="memfs-ll-inval", daemon=True)
        t.start()
        return t

    def stop_invalidator(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()


def serve(tree: Tree, mountpoint: str, *, watch: Callable[[Callable[[], None]], None] | None = None,
          ready: Callable[[LowLevelOps], None] | None = None, debug: bool = False,
          no_open: bool | None = None) -> LowLevelOps:
    """Mount ``tree`` at ``mountpoint`` and serve it until unmounted (blocks).

    ``watch(listener)`` registers the listener that must run after every model change
    (``machine.listeners.append``). Without it, nothing is ever invalidated.
    ``ready(ops)`` runs (in the trio thread) once the session is mounted.
    """
    if no_open is None:
        no_open = os.environ.get("MEMFS_LL_NO_OPEN") == "1"
    ops = LowLevelOps(tree, no_open=no_open)
    opts = set(pyfuse3.default_options)
    opts |= {"fsname=memfs", "subtype=memfs", "default_permissions"}
    if os.geteuid() == 0:
        opts.add("allow_other")
    if debug:
        opts.add("debug")
    if watch is not None:
        watch(ops.changed)
    pyfuse3.init(ops, mountpoint, opts)
    ops.start_invalidator()

    async def main() -> None:
        if ready is not None:
            ready(ops)
        await pyfuse3.main()

    try:
        trio.run(main)
    finally:
        ops.stop_invalidator()
        pyfuse3.close(unmount=True)
    return ops
