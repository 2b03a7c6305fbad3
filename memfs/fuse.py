"""The FUSE adapter (fusepy, libfuse 2): serve a :class:`memfs.sysfs.kernfs.Tree` as a mount.

All semantics come from the tree; this module maps FUSE operations to
``Tree.resolve`` and the node callbacks, with sysfs-like behaviour:

* attributes are ``S_IFREG`` with ``st_size`` 4096 whatever their content;
* every ``write(2)`` is one complete ``store()`` of (at most 4096 bytes of)
  its buffer, whatever the file offset;
* an attribute whose ``alive()`` turned false fails I/O with ``ENODEV``;
* the namespace is immutable from userspace (create/mkdir/unlink/... fail).

Two ways to serve, chosen by :func:`serve`:

* **page cache** (``serve(watch=...)``: the tree's owner reports every change,
  which is what the daemon does).  ``open()`` answers ENOSYS once, so the kernel
  stops sending OPEN/FLUSH/RELEASE for the mount (fuse_file_open(), fc->no_open,
  fs/fuse/file.c, Linux 3.x+), and attribute texts are read through the kernel's
  page cache: a repeated read of an unchanged attribute costs no upcall at all.
  :class:`Invalidator` then drops exactly the cached texts a change altered
  (FUSE_NOTIFY_INVAL_INODE), and the directory entries that appeared or vanished
  (FUSE_NOTIFY_INC_EPOCH on Linux 6.16+, else FUSE_NOTIFY_INVAL_ENTRY).
* **direct** (no ``watch``): every open takes a snapshot of ``show()`` and every
  read is answered from it (``direct_io``), like seq_file; nothing is cached, so
  a tree whose owner does not report changes is never stale.

Any unexpected exception is logged and turned into ``EIO``.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import ctypes
import errno
import itertools
import logging
import os
import platform
import re
import select
import stat
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Hashable, Iterator, Protocol

import fuse as _fusepy  # fusepy (top-level module "fuse"), not this module

from memfs.sysfs.kernfs import CONST, GLOBAL, Attr, Change, DirNode, Link, Node, Tree

__all__ = ["SysfsOperations", "Invalidator", "serve", "kernel_has_epoch", "ENTRY_TIMEOUT",
           "ATTR_TIMEOUT", "mount_operations", "default_options", "STORE_MAX", "ATTR_SIZE"]

log = logging.getLogger(__name__)

#: Longest buffer handed to ``store()`` (sysfs truncates writes to PAGE_SIZE).
STORE_MAX = 4096
#: ``st_size`` of every attribute (sysfs reports PAGE_SIZE, not the content size).
ATTR_SIZE = 4096

#: Seconds the kernel may cache a node's attributes (see :func:`default_options`).
ATTR_TIMEOUT = 3600
#: Seconds the kernel may cache directory entries when :func:`serve` is given a
#: ``watch`` (the model then tells the adapter about every change, and the
#: adapter drops the kernel's entries at once: see :class:`Invalidator`).
ENTRY_TIMEOUT = 3600
#: enum fuse_notify_code FUSE_NOTIFY_INC_EPOCH (Linux 6.16+): every dentry created
#: (or whose LOOKUP started) before the bump is invalid on its next use.
FUSE_NOTIFY_INC_EPOCH = 8
_EPOCH_MSG = struct.pack("<IiQ", 16, FUSE_NOTIFY_INC_EPOCH, 0)  # struct fuse_out_header
_PATH_CACHE_MAX = 1 << 20  # entries; a full listing of 65,536 blocks x 12 files fits

_O_ACCMODE = os.O_ACCMODE


class ContextLock(Protocol):
    """The tree owner's lock (threading.RLock): held while the owner changes the tree."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...
    def release(self) -> None: ...
    def __enter__(self) -> bool: ...
    def __exit__(self, *exc: object) -> None: ...


class _Handle:
    """State of one open attribute file (one FUSE ``fh``)."""

    __slots__ = ("attr", "data", "dirty")

    def __init__(self, attr: Attr, data: bytes | None) -> None:
        self.attr = attr
        self.data = data  # snapshot of show(); None if not opened for reading
        self.dirty = False  # some read already returned data from `data`


def _encode(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8")


def _err(code: int) -> _fusepy.FuseOSError:
    return _fusepy.FuseOSError(code)


#: enum fuse_notify_code (include/uapi/linux/fuse.h): FUSE_NOTIFY_INVAL_INODE drops an
#: inode's cached attributes and pages (fuse_reverse_inval_inode(), fs/fuse/inode.c);
#: FUSE_NOTIFY_INVAL_ENTRY drops one dentry (fuse_reverse_inval_entry(), fs/fuse/dir.c).
FUSE_NOTIFY_INVAL_INODE = 2
FUSE_NOTIFY_INVAL_ENTRY = 3
_HEADER = struct.Struct("<IiQ")  # struct fuse_out_header {len, error (= notify code), unique 0}
_INVAL_INODE = struct.Struct("<Qqq")  # struct fuse_notify_inval_inode_out {ino, off, len}
_INVAL_ENTRY = struct.Struct("<QII")  # struct fuse_notify_inval_entry_out {parent, namelen, flags}


#: The program of the inode-number helper (Invalidator._ino): statx(AT_STATX_DONT_SYNC)
#: of each path read from stdin, the st_ino (or "-") written to stdout.  It dies with
#: the daemon (PR_SET_PDEATHSIG) and holds no /dev/fuse descriptor.
_INO_HELPER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
buf = ctypes.create_string_buffer(256)
for line in sys.stdin.buffer:
    path = line.rstrip(b"\n")
    # AT_SYMLINK_NOFOLLOW | AT_STATX_DONT_SYNC, STATX_INO
    ok = libc.statx(-100, path, 0x100 | 0x4000, 0x100, buf) == 0
    sys.stdout.write((str(int.from_bytes(buf.raw[32:40], "little")) if ok else "-") + "\n")
    sys.stdout.flush()
"""
_INO_TIMEOUT = 2.0  # seconds; a helper stuck longer is replaced


class _InoHelper:
    """Learns the kernel's inode numbers of paths on the mount, from another process.

    The daemon must never access its own mount: a path walk may wait, uninterruptibly,
    for an inode lock (fuse_lock_inode()) or a page lock that a request the daemon has
    not answered yet holds; killed meanwhile, the daemon could not exit, its /dev/fuse
    would stay open, and every process using the mount would hang.  A child process
    (no /dev/fuse descriptor of its own) asks instead; the daemon only waits on a pipe,
    with a timeout.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", _INO_HELPER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
        self._proc = proc
        return proc

    def ino(self, path: str) -> int | None:
        with self._lock:
            proc = self._proc or self._start()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(os.fsencode(path) + b"\n")
                proc.stdin.flush()
                ready, _, _ = select.select([proc.stdout], [], [], _INO_TIMEOUT)
                line = proc.stdout.readline() if ready else b""
            except OSError:
                line = b""
            if not line.endswith(b"\n"):
                self._stop(proc)  # stuck or dead: a fresh one next time
                return None
        text = line.strip()
        return int(text) if text.isdigit() else None

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = None
        with contextlib.suppress(OSError):
            proc.kill()  # our own child, by its Popen

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._stop(self._proc)


class _Cached:
    """One attribute text the kernel may hold in its page cache (read since its last drop)."""

    __slots__ = ("attr", "scope", "text", "ino")

    def __init__(self, attr: Attr, scope: str) -> None:
        self.attr = attr
        self.scope = scope
        self.text: bytes | None = None  # None while the READ that caches it is in flight
        self.ino: int | None = None  # the kernel's inode (= libfuse nodeid), once known


class Invalidator:
    """Keeps the kernel's caches of one mount exact while the tree's owner changes it.

    The owner calls the invalidator (``inv(change)``, a :class:`Change`) after every
    change, under its own lock; that only records.  The thread that made the change
    then sends the notifications with its lock released (``with inv.collect(): ...``
    around the change, as the adapter's ``write()`` and the daemon's control handler
    do); changes made by other threads are sent by the invalidator's own thread.

    Which cached texts a change altered is derived, not guessed: every attribute
    text the kernel may hold is registered when its READ is answered, keyed by its
    owner (a memory block) and scope (:data:`CONST`/:data:`OWNER`/:data:`GLOBAL`);
    a change names the owners it touched, so only the registered texts of those
    owners, and of GLOBAL scope (few: /proc, node, parameter files, offline blocks'
    valid_zones), are shown again and compared.  Only those that differ are dropped,
    so a change costs O(texts it may alter), never O(blocks).

    Hazards (fs/fuse/inode.c fuse_reverse_inval_inode() waits for each cached page's
    lock, and a page being written stays locked until the WRITE is answered):
    notifications are never sent with the model lock or the registry lock held, a
    ``write()`` never waits for another thread's notifications, and no notification
    is sent for a file whose WRITE is in flight (the kernel drops that page itself:
    the write invalidates the inode's attributes, and the next read finds st_size
    4096 instead of the short size the cached read left, fuse_change_attributes()).
    """

    def __init__(self, ops: "SysfsOperations", mountpoint: str, lock: ContextLock | None,
                 epoch: bool) -> None:
        self.ops = ops
        self.mountpoint = os.path.realpath(mountpoint)
        self.model_lock = lock
        self.epoch = epoch  # FUSE_NOTIFY_INC_EPOCH for entries, else INVAL_ENTRY per name
        self.fd: int | None = None  # /dev/fuse of the mount, set by init()
        self._mu = threading.Lock()  # registry, indexes, orphans, in-flight writes
        self._cached: dict[str, _Cached] = {}
        self._by_owner: dict[Hashable, set[str]] = {}
        self._global: set[str] = set()
        self._unfilled: set[str] = set()  # READ in flight: dropped by any flush
        self._suspect: set[str] = set()  # shown while a change was running: checked by every flush
        self._writing: dict[str, int] = {}
        self._orphans: list[Change] = []  # changes of threads that do not flush themselves
        self._page_drops: set[str] = set()
        self._need_ino: set[str] = set()
        self._local = threading.local()
        self._wake = threading.Condition(self._mu)
        self._stopped = False
        #: notifications sent, by kind (tests count them instead of timing anything)
        self.counts = {"inval_inode": 0, "inval_entry": 0, "inc_epoch": 0, "shown": 0}
        self._thread: threading.Thread | None = None
        self._helper = _InoHelper()

    # -- owner side ----------------------------------------------------------

    def __call__(self, change: Change | None = None) -> None:
        """Record one change (under the owner's lock); None: anything may have changed."""
        if change is None:
            change = Change(entries=None, everything=True)
        collected = getattr(self._local, "changes", None)
        if collected is not None:
            collected.append(change)
            return
        with self._mu:
            self._orphans.append(change)
            self._wake.notify()

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        """Send the notifications for the changes this thread makes inside the block,
        when it ends (also when it raises), outside the owner's lock."""
        outer = getattr(self._local, "changes", None)
        if outer is not None:  # nested: the outermost block sends
            yield
            return
        changes: list[Change] = []
        self._local.changes = changes
        try:
            yield
        finally:
            self._local.changes = None
            self.flush(changes)

    # -- adapter side --------------------------------------------------------

    def register(self, path: str, attr: Attr) -> _Cached | None:
        """Before showing ``attr`` for a READ: the kernel is about to cache its text."""
        scope = attr.scope
        if callable(scope):
            scope = scope()
        if scope == CONST and attr.owner is None:
            return None  # never changes, never dies
        entry = _Cached(attr, scope)
        with self._mu:
            old = self._cached.get(path)
            if old is not None:
                self._unindex(path, old)
            self._cached[path] = entry
            if attr.owner is not None:
                self._by_owner.setdefault(attr.owner, set()).add(path)
            if scope == GLOBAL:
                self._global.add(path)
            if old is not None and old.ino is not None:
                entry.ino = old.ino
            else:
                self._need_ino.add(path)
                self._wake.notify()
            self._unfilled.add(path)
        return entry

    def filled(self, path: str, entry: _Cached, text: bytes | None, consistent: bool) -> None:
        """After showing: ``text`` is what the kernel caches (None: the READ failed)."""
        with self._mu:
            entry.text = text
            if self._cached.get(path) is not entry:
                return  # already dropped by a flush that saw the READ in flight
            self._unfilled.discard(path)
            if text is None:
                self._unindex(path, entry)
                del self._cached[path]
            elif not consistent:
                self._suspect.add(path)

    def _unindex(self, path: str, entry: _Cached) -> None:
        owner = entry.attr.owner
        if owner is not None:
            paths = self._by_owner.get(owner)
            if paths is not None:
                paths.discard(path)
                if not paths:
                    del self._by_owner[owner]
        self._global.discard(path)
        self._unfilled.discard(path)
        self._suspect.discard(path)

    def show(self, attr: Attr) -> tuple[bytes, bool]:
        """``attr.show()`` and whether no change was running meanwhile (then the text is
        one the model had between changes; otherwise every flush checks it again, e.g.
        ``going-offline`` shown during an offline that then fails without a change)."""
        lock = self.model_lock
        if lock is None:
            return _encode(attr.show()), True  # type: ignore[misc]
        if lock.acquire(blocking=False):
            try:
                return _encode(attr.show()), True  # type: ignore[misc]
            finally:
                lock.release()
        return _encode(attr.show()), False  # type: ignore[misc]

    @contextlib.contextmanager
    def writing(self, path: str, attr: Attr, data: bytes) -> Iterator[None]:
        """Around the store of a WRITE of ``data`` to ``path`` (its page is locked by the
        kernel until the WRITE is answered); sends the store's changes when it ends."""
        with self._mu:
            self._writing[path] = self._writing.get(path, 0) + 1
            e = self._cached.get(path)
            old = e.text if e is not None else None
        try:
            with self.collect():
                yield
        finally:
            with self._mu:
                n = self._writing[path] - 1
                if n:
                    self._writing[path] = n
                else:
                    del self._writing[path]
            if old is not None and attr.readable:
                self._after_write(path, old, data, attr)

    def _after_write(self, path: str, old: bytes, data: bytes, attr: Attr) -> None:
        """A WRITE copies its bytes into the file's cached page (fuse_fill_write_pages(),
        fs/fuse/file.c) and leaves i_size at max(old size, written length).  The next
        read asks GETATTR (the write dropped the attributes), whose st_size, the text's
        length, makes the kernel drop the page whenever it differs from that i_size
        (fuse_change_attributes()).  Only a page of the very length of the text that is
        not the text ("on" written to `online`, whose text is "1\\n") needs dropping;
        that notification waits for the page's lock, so the invalidator's thread sends
        it, never the WRITE's own handler."""
        size = max(len(old), len(data))
        page = (data + old[len(data):])[:size]
        try:
            text, _ = self.show(attr)
        except OSError:
            return
        if size == len(text) and page != text:
            with self._mu:
                self._page_drops.add(path)
                self._wake.notify()

    # -- sending -------------------------------------------------------------

    def flush(self, changes: list[Change]) -> None:
        """Drop every cached text and entry that ``changes`` altered (outside any lock)."""
        owners: set[Hashable] = set()
        removed: set[Hashable] = set()
        entries: list[str] = []
        all_entries = everything = False
        for c in changes:
            owners |= c.owners
            removed |= c.removed
            everything |= c.everything
            if c.entries is None:
                all_entries = True
            else:
                entries.extend(c.entries)
        with self._mu:
            if not (changes or self._suspect or self._unfilled):
                return
            check: dict[str, _Cached] = {}
            drop: dict[str, _Cached] = {}
            for owner in owners | removed:
                for path in self._by_owner.get(owner, ()):
                    e = self._cached[path]
                    if owner in removed:
                        drop[path] = e
                    elif e.scope != CONST:
                        check[path] = e
            if everything:
                for path in self._global:
                    check.setdefault(path, self._cached[path])
            for path in self._suspect:
                check.setdefault(path, self._cached[path])
            for path in self._unfilled:
                drop[path] = self._cached[path]
            for path in drop:
                check.pop(path, None)
        if check:
            changed = self._compare(check)
            drop.update(changed)
        with self._mu:
            for path in check:
                if self._cached.get(path) is check[path]:
                    self._suspect.discard(path)
            for path, e in drop.items():
                if self._cached.get(path) is e:
                    self._unindex(path, e)
                    del self._cached[path]
            writing = set(self._writing)
        for path, e in drop.items():
            if path not in writing:
                self._inval_inode(path, e)
        if entries or all_entries or removed:
            self.ops.forget_paths()
            if self.epoch or all_entries:
                self._inc_epoch()
            else:
                for path in entries:
                    self._inval_entry(path)

    def _compare(self, check: dict[str, _Cached]) -> dict[str, _Cached]:
        """The entries of ``check`` whose text the model would now show differently."""
        out: dict[str, _Cached] = {}
        lock = self.model_lock if self.model_lock is not None else contextlib.nullcontext()
        with lock:  # one consistent state of the model for all of them
            for path, e in check.items():
                self.counts["shown"] += 1
                try:
                    now: bytes | None = _encode(e.attr.show()) if e.attr.is_alive() else None  # type: ignore[misc]
                except OSError:
                    now = None
                if now is None or now != e.text:
                    out[path] = e
        return out

    def _ino(self, path: str, e: _Cached | None = None) -> int | None:
        """The kernel's inode number of ``path`` (libfuse 2 without use_ino reports its
        nodeid as st_ino), or the last one seen if the path is gone.

        Asked from another process (:class:`_InoHelper`), from the kernel's cached
        attributes (statx AT_STATX_DONT_SYNC: no GETATTR)."""
        ino = self._helper.ino(self.mountpoint + path)
        if ino is None:
            return e.ino if e is not None else None
        if e is not None:
            e.ino = ino
        return ino

    def _send(self, msg: bytes, what: str) -> bool:
        fd = self.fd
        if fd is None:
            return False
        try:
            os.write(fd, msg)
        except OSError as err:
            if err.errno != errno.ENOENT:  # ENOENT: the kernel has no such inode/entry cached
                log.error("memfs: %s failed: %s; the kernel may serve a stale copy", what, err)
            return False
        return True

    def _inval_inode(self, path: str, e: _Cached) -> None:
        ino = e.ino if e.ino is not None else self._ino(path, e)
        if ino is None:
            return
        # off 0, len 0: drop the attributes and every cached page of the inode
        body = _INVAL_INODE.pack(ino, 0, 0)
        if self._send(_HEADER.pack(_HEADER.size + len(body), FUSE_NOTIFY_INVAL_INODE, 0) + body,
                      "FUSE_NOTIFY_INVAL_INODE"):
            self.counts["inval_inode"] += 1

    def _inval_entry(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        pino = self._ino(parent)
        if pino is None:
            return  # the parent is not cached either
        raw = name.encode("utf-8", "surrogateescape")
        body = _INVAL_ENTRY.pack(pino, len(raw), 0) + raw + b"\0"
        if self._send(_HEADER.pack(_HEADER.size + len(body), FUSE_NOTIFY_INVAL_ENTRY, 0) + body,
                      "FUSE_NOTIFY_INVAL_ENTRY"):
            self.counts["inval_entry"] += 1

    def _inc_epoch(self) -> None:
        if self._send(_EPOCH_MSG, "FUSE_NOTIFY_INC_EPOCH"):
            self.counts["inc_epoch"] += 1

    # -- the invalidator's thread ------------------------------------------------

    def start(self, fd: int | None) -> None:
        self.fd = fd
        self._thread = threading.Thread(target=self._run, name="memfs-invalidate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._mu:
            self._stopped = True
            self.fd = None
            self._wake.notify()
        self._helper.close()

    def _run(self) -> None:
        while True:
            with self._mu:
                self._wake.wait_for(lambda: self._stopped or self._orphans or self._need_ino
                                    or self._page_drops)
                if self._stopped:
                    return
                orphans, self._orphans = self._orphans, []
                need, self._need_ino = self._need_ino, set()
                drops, self._page_drops = self._page_drops, set()
                need_entries = [(p, self._cached[p]) for p in need if p in self._cached]
            try:
                for path, e in need_entries:
                    self._ino(path, e)
                if orphans:
                    self.flush(orphans)
                for path in drops:
                    ino = self._ino(path)
                    if ino is not None:
                        body = _INVAL_INODE.pack(ino, 0, 0)
                        self._send(_HEADER.pack(_HEADER.size + len(body), FUSE_NOTIFY_INVAL_INODE, 0)
                                   + body, "FUSE_NOTIFY_INVAL_INODE")
            except Exception:  # never let the thread die: log and go on
                log.exception("memfs: invalidation failed")


class SysfsOperations(_fusepy.Operations):
    """fusepy ``Operations`` serving a :class:`Tree` with sysfs semantics."""

    use_ns = True  # timestamps in integer nanoseconds (silences fusepy warning)

    def __init__(self, tree: Tree, *, ready: Callable[[], None] | None = None) -> None:
        self.tree = tree
        self._ready = ready
        # Set by serve(watch=...): keeps the kernel's caches (entries, and texts in
        # page-cache mode) exact.
        self.inv: Invalidator | None = None
        self.page_cache = False
        # path -> node, kept only while the tree's owner reports changes (serve(watch=)):
        # each FUSE request carries a full path, and resolving it again costs a lookup
        # per component. Cleared when entries change (forget_paths()); `_path_gen` keeps
        # a resolve that raced with a change from caching what it found before it.
        self._paths: dict[str, Node] | None = None
        self._path_gen = 0
        #: FUSE requests that reached Python, by operation (tests count them)
        self.upcalls: collections.Counter[str] = collections.Counter()
        self._handles: dict[int, _Handle] = {}
        self._lock = threading.Lock()
        self._fh_counter = itertools.count(1)
        now = time.time_ns()
        self._times = {"st_atime": now, "st_mtime": now, "st_ctime": now}
        self._dir_stat = self._mkstat(stat.S_IFDIR | 0o755, 2, 0)
        self._attr_stats: dict[int, dict[str, int]] = {}
        self._dead_stat = self._mkstat(stat.S_IFREG | 0o644, 1, ATTR_SIZE)
        # Cached stat dicts are shared between calls; fusepy only reads them.
        self._dir_dtype = {"st_mode": stat.S_IFDIR | 0o755}
        self._reg_dtype = {"st_mode": stat.S_IFREG | 0o444}
        self._lnk_dtype = {"st_mode": stat.S_IFLNK | 0o777}

    # -- helpers ---------------------------------------------------------

    def _mkstat(self, mode: int, nlink: int, size: int) -> dict[str, int]:
        st = {"st_mode": mode, "st_nlink": nlink, "st_size": size,
              "st_uid": 0, "st_gid": 0, "st_blksize": 4096, "st_blocks": 0}
        st.update(self._times)
        return st

    def _stat(self, node: Node) -> dict[str, int]:
        if isinstance(node, Attr):
            st = self._attr_stats.get(node.mode)
            if st is None:
                st = self._attr_stats[node.mode] = self._mkstat(
                    stat.S_IFREG | node.mode, 1, ATTR_SIZE)
            return st
        if isinstance(node, DirNode):
            return self._dir_stat
        if isinstance(node, Link):
            return self._mkstat(stat.S_IFLNK | 0o777, 1, len(_encode(node.target)))
        raise TypeError(f"not a kernfs node: {node!r}")

    def _dtype_stat(self, node: Node) -> dict[str, int]:
        if isinstance(node, Attr):
            return self._reg_dtype
        if isinstance(node, DirNode):
            return self._dir_dtype
        return self._lnk_dtype

    def _handle(self, fh: int) -> _Handle:
        h = self._handles.get(fh)
        if h is None:
            raise _err(errno.EBADF)
        return h

    # -- dispatch: every operation goes through here ----------------------

    def __call__(self, op: str, *args: Any) -> Any:
        self.upcalls[op] += 1
        method = getattr(self, op, None)
        if method is None:
            raise _err(errno.ENOSYS)
        try:
            return method(*args)
        except OSError as e:
            if isinstance(e.errno, int) and e.errno > 0:
                if type(e) is _fusepy.FuseOSError:
                    raise
                raise _err(e.errno) from None
            log.error("memfs: %s(%r) raised %r without a valid errno; returning EIO",
                      op, args[0] if args else None, e)
            raise _err(errno.EIO) from None
        except Exception as e:  # never let a traceback escape into fusepy
            log.error("memfs: %s(%r) failed: %s: %s; returning EIO",
                      op, args[0] if args else None, type(e).__name__, e)
            log.debug("memfs: traceback of failed %s", op, exc_info=True)
            raise _err(errno.EIO) from None

    # -- lifecycle --------------------------------------------------------

    def init(self, path: str) -> None:
        """Called by libfuse once the kernel handshake (FUSE_INIT) is done."""
        inv = self.inv
        if inv is not None:
            fd: int | None = None
            try:
                fd = _session_fd()
            except Exception as e:  # pragma: no cover - libfuse without the symbols
                log.error("memfs: cannot reach /dev/fuse to send invalidations (%s); "
                          "cached texts and entries may go stale", e)
            inv.start(fd)
        ready = self._ready
        if ready is not None:
            self._ready = None
            try:
                ready()
            except Exception:  # init may not fail; just report it
                log.exception("memfs: ready() callback failed")

    def destroy(self, path: str) -> None:
        if self.inv is not None:
            self.inv.stop()
        with self._lock:
            self._handles.clear()

    def forget_paths(self) -> None:
        """Entries changed: resolve every path again (the path cache of ``_resolve``)."""
        if self._paths is not None:
            with self._lock:
                self._path_gen += 1
                self._paths = {}

    # -- namespace --------------------------------------------------------

    def _resolve(self, path: str) -> Node:
        paths = self._paths
        if paths is None:
            return self.tree.resolve(path)
        node = paths.get(path)
        if node is None:
            gen = self._path_gen
            node = self.tree.resolve(path)
            with self._lock:
                if gen == self._path_gen and len(self._paths) < _PATH_CACHE_MAX:
                    self._paths[path] = node
        return node

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        if fh:  # fstat on an open attribute: works even if it was removed
            h = self._handles.get(fh)
            if h is not None:
                return self._stat(h.attr)
        inv = self.inv
        if inv is None or not self.page_cache:
            return self._stat(self._resolve(path))
        try:
            node = self._resolve(path)
        except OSError:
            if fh == 0:
                # asked through an open file (fusepy passes fh None for LOOKUP and path
                # GETATTR): a removed attribute still has a stat, so that the read or
                # write that asked goes on and fails ENODEV, as on sysfs
                return self._dead_stat
            raise
        if not isinstance(node, Attr) or not node.readable:
            return self._stat(node)
        # Page-cache mode: st_size is the length of the text.  The kernel trusts
        # st_size for reads from its cache (filemap_read() stops at i_size), and a
        # short READ shrinks i_size and drops the attributes, so with 4096 every
        # fstat(2) (cat, fopen) would drop the cached page again; the size is then
        # part of what the kernel caches, so the text is registered as cached.
        entry = inv.register(path, node)
        text: bytes | None = None
        try:
            text, consistent = inv.show(node)
        except OSError:
            return self._stat(node)  # the READ will report the error
        finally:
            if entry is not None:
                inv.filled(path, entry, text, consistent if text is not None else True)
        st = dict(self._stat(node))
        st["st_size"] = len(text)
        return st

    def readdir(self, path: str, fh: int) -> Iterator[tuple[str, dict[str, int], int]]:
        node = self._resolve(path)
        if not isinstance(node, DirNode):
            raise _err(errno.ENOTDIR)
        # libfuse only takes the file type (d_type) from these stats, so pass
        # st_mode alone: fusepy copies every key into a struct per entry.
        # Materialized here so lookup errors surface as errnos, not midway
        # through fusepy's iteration.
        dtype_of = self._dtype_stat
        d = self._dir_dtype
        out = [(".", d, 0), ("..", d, 0)]
        out.extend((name, dtype_of(child), 0) for name, child in node.entries())
        return iter(out)

    def readlink(self, path: str) -> str:
        node = self._resolve(path)
        if not isinstance(node, Link):
            raise _err(errno.EINVAL)
        return node.target

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 0, "f_bfree": 0,
                "f_bavail": 0, "f_files": 0, "f_ffree": 0, "f_favail": 0,
                "f_namemax": 255}

    # -- file I/O ---------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        if self.page_cache:
            # Page-cache mode: ENOSYS makes the kernel stop sending OPEN (and so
            # FLUSH/RELEASE) for the whole mount (fuse_file_open(), fs/fuse/file.c):
            # read() and write() then get fh 0 and find the attribute by its path.
            raise _err(errno.ENOSYS)
        node = self._resolve(path)
        if not isinstance(node, Attr):
            # The kernel never opens dirs/links through FUSE open().
            raise _err(errno.EISDIR if isinstance(node, DirNode) else errno.ELOOP)
        acc = flags & _O_ACCMODE
        want_read = acc != os.O_WRONLY
        want_write = acc != os.O_RDONLY
        # sysfs refuses these even to root (no show/store, or mode bits off).
        if (want_write and not node.writable) or (want_read and not node.readable):
            raise _err(errno.EACCES)
        if not node.is_alive():
            raise _err(errno.ENODEV)
        data = _encode(node.show()) if want_read else None  # type: ignore[misc]
        fh = next(self._fh_counter)
        with self._lock:
            self._handles[fh] = _Handle(node, data)
        return fh

    def _attr_at(self, path: str) -> Attr:
        """The attribute a READ/WRITE without an open handle is for: its file was opened
        (no OPEN upcall), so a path that no longer resolves is an attribute that was
        removed since, and I/O on it fails with ENODEV, as on a removed kernfs node."""
        try:
            node = self._resolve(path)
        except OSError:
            raise _err(errno.ENODEV) from None
        if not isinstance(node, Attr):
            raise _err(errno.EISDIR if isinstance(node, DirNode) else errno.EINVAL)
        if not node.is_alive():
            raise _err(errno.ENODEV)
        return node

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        inv = self.inv
        if inv is not None and not fh:
            attr = self._attr_at(path)
            if not attr.readable:  # root opened a write-only attribute: no OPEN to refuse it
                raise _err(errno.EACCES)
            entry = inv.register(path, attr)
            text: bytes | None = None
            try:
                text, consistent = inv.show(attr)
            finally:
                if entry is not None:
                    inv.filled(path, entry, text, consistent if text is not None else True)
            return text[offset:offset + size]
        h = self._handle(fh)
        attr = h.attr
        if not attr.is_alive():
            raise _err(errno.ENODEV)
        data = h.data
        if data is None:
            raise _err(errno.EBADF)
        if offset == 0 and h.dirty:  # re-read from the start: fresh snapshot
            data = h.data = _encode(attr.show())  # type: ignore[misc]
        chunk = data[offset:offset + size]
        if chunk:
            h.dirty = True
        return chunk

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        inv = self.inv
        if inv is not None and not fh:
            attr = self._attr_at(path)
            if not attr.writable:  # root opened a read-only attribute: no OPEN to refuse it
                raise _err(errno.EACCES)
            n = len(data)
            if n == 0:
                return 0
            with inv.writing(path, attr, data):
                attr.store(data[:STORE_MAX] if n > STORE_MAX else data)  # type: ignore[misc]
            return n
        h = self._handle(fh)
        attr = h.attr
        if not attr.is_alive():
            raise _err(errno.ENODEV)
        n = len(data)
        if n == 0:
            return 0
        with inv.collect() if inv is not None else contextlib.nullcontext():
            attr.store(data[:STORE_MAX] if n > STORE_MAX else data)  # type: ignore[misc]
        if h.data is not None:
            h.dirty = True  # like seq_file: a read from offset 0 after a write shows the new value
        return n  # the whole buffer counts as consumed, as sysfs stores do

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        # No-op for attributes so `echo x > attr` (O_TRUNC) works.
        h = self._handles.get(fh) if fh else None
        node: Node = h.attr if h is not None else self._resolve(path)
        if isinstance(node, DirNode):
            raise _err(errno.EISDIR)
        if not isinstance(node, Attr):
            raise _err(errno.EINVAL)
        return 0

    # Left out of the libfuse operations table on purpose (fusepy registers only
    # non-None methods).  The kernel then gets ENOSYS once from libfuse itself
    # and stops sending FLUSH/FSYNC/FSYNCDIR for good (fc->no_flush, no_fsync),
    # and libfuse answers OPENDIR/RELEASEDIR/ACCESS without calling Python:
    # one round trip less per close(2), and no Python work for the others.
    flush = None
    fsync = None
    fsyncdir = None
    opendir = None
    releasedir = None
    access = None
    bmap = None
    ioctl = None
    lock = None

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            self._handles.pop(fh, None)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self.tree.resolve(path)
        return 0

    # -- everything userspace may not do on sysfs ---------------------------

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        raise _err(errno.EACCES)

    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise _err(errno.EPERM)

    def mkdir(self, path: str, mode: int) -> int:
        raise _err(errno.EPERM)

    def rmdir(self, path: str) -> int:
        raise _err(errno.EPERM)

    def unlink(self, path: str) -> int:
        raise _err(errno.EPERM)

    def rename(self, old: str, new: str) -> int:
        raise _err(errno.EPERM)

    def symlink(self, target: str, source: str) -> int:
        raise _err(errno.EPERM)

    def link(self, target: str, source: str) -> int:
        raise _err(errno.EPERM)

    def chmod(self, path: str, mode: int) -> int:
        raise _err(errno.EPERM)

    def chown(self, path: str, uid: int, gid: int) -> int:
        raise _err(errno.EPERM)

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        self.tree.resolve(path)
        raise _err(errno.ENODATA)

    def listxattr(self, path: str) -> list[str]:
        self.tree.resolve(path)
        return []

    def setxattr(self, path: str, name: str, value: bytes, options: int,
                 position: int = 0) -> int:
        raise _err(errno.EOPNOTSUPP)

    def removexattr(self, path: str, name: str) -> int:
        raise _err(errno.EOPNOTSUPP)


def default_options(allow_other: bool | None = None) -> dict[str, Any]:
    """The libfuse ``-o`` options memfs mounts with (the benchmark's floor uses them too)."""
    if allow_other is None:
        allow_other = os.geteuid() == 0
    opts: dict[str, Any] = {
        "fsname": "memfs",
        "subtype": "memfs",
        "default_permissions": True,  # the kernel checks modes/uids itself
        "direct_io": True,      # never page-cache attribute contents
        "big_writes": True,     # one write(2) <= 128 KiB = one FUSE_WRITE
        "entry_timeout": 0,     # blocks appear/vanish at once
        "negative_timeout": 0,
        # The stat of a node never changes while its path resolves to it (mode,
        # size 4096, times, nlink are constants of its kind), so the kernel may
        # keep attributes: entries are still revalidated on every path walk
        # (entry_timeout 0), so a vanished block fails with ENOENT at once.
        # This saves the GETATTR that default_permissions would otherwise send
        # for every path component and every open.
        "attr_timeout": ATTR_TIMEOUT,
    }
    if allow_other:
        opts["allow_other"] = True
    return opts


PATH_ENCODING = "memfs_utf8_surrogateescape"


def path_encoding() -> str:
    """The codec fusepy decodes request paths with: UTF-8, and any other byte as a lone
    surrogate (surrogateescape), so that a name that is not UTF-8 (``stat MNT/$'\\xff'``)
    is looked up, and not found (ENOENT, as on sysfs), instead of failing in fusepy's
    ``path.decode("utf-8")`` with EINVAL and a traceback in the log.
    (The default ``encoding=`` of every mount.)"""

    def search(name: str) -> codecs.CodecInfo | None:
        if name != PATH_ENCODING:
            return None
        utf8 = codecs.lookup("utf-8")
        return codecs.CodecInfo(lambda s, errors="strict": utf8.encode(s, "surrogateescape"),
                                lambda b, errors="strict": utf8.decode(b, "surrogateescape"),
                                name=PATH_ENCODING)
    try:
        codecs.lookup(PATH_ENCODING)
    except LookupError:
        codecs.register(search)
    return PATH_ENCODING


def mount_operations(ops: _fusepy.Operations, mountpoint: str, *, foreground: bool = True,
                     allow_other: bool | None = None, debug: bool = False,
                     **options: str | int | bool) -> None:
    """Mount any fusepy ``Operations`` with memfs's options (blocks until unmounted)."""
    opts: dict[str, str | int | bool] = {**default_options(allow_other), "encoding": path_encoding()}
    opts.update(options)
    _fusepy.FUSE(ops, mountpoint, foreground=foreground, nothreads=False, debug=debug, **opts)


def kernel_has_epoch(release: str | None = None) -> bool:
    """True if this kernel takes FUSE_NOTIFY_INC_EPOCH (Linux 6.16 and later)."""
    m = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (6, 16)


def _session_fd() -> int:
    """The /dev/fuse descriptor of the session serving the current request (from init()).

    libfuse 2.9: fuse_get_session() of the context's struct fuse, then the session's
    only channel (fuse_session_next_chan) and its descriptor (fuse_chan_fd)."""
    lib = _fusepy._libfuse
    ctx = lib.fuse_get_context()
    f = ctypes.c_void_p(ctx.contents.fuse)
    lib.fuse_get_session.restype = ctypes.c_void_p
    lib.fuse_get_session.argtypes = [ctypes.c_void_p]
    se = ctypes.c_void_p(lib.fuse_get_session(f))
    lib.fuse_session_next_chan.restype = ctypes.c_void_p
    lib.fuse_session_next_chan.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.fuse_chan_fd.restype = ctypes.c_int
    lib.fuse_chan_fd.argtypes = [ctypes.c_void_p]
    fd = lib.fuse_chan_fd(ctypes.c_void_p(lib.fuse_session_next_chan(se, None)))
    if fd < 0:
        raise OSError(errno.EBADF, "no /dev/fuse descriptor")
    return fd


def serve(
    tree: Tree,
    mountpoint: str,
    *,
    foreground: bool = True,
    allow_other: bool | None = None,
    ready: Callable[[], None] | None = None,
    debug: bool = False,
    watch: Callable[[Invalidator], object] | None = None,
    lock: ContextLock | None = None,
    epoch: bool | None = None,
    page_cache: bool = True,
    **options: str | int | bool,
) -> None:
    """Mount ``tree`` at ``mountpoint`` and serve it until unmounted.

    Blocks (with ``foreground=True``) until ``fusermount -u`` or a signal.
    ``allow_other`` defaults to True when running as root.  ``ready()`` is
    called once, from a FUSE thread, when the kernel has completed the mount
    handshake and requests are being served.  Extra ``options`` are passed to
    libfuse as ``-o key=value`` (``True`` for bare flags) and override
    :func:`default_options`.

    ``watch``, if given, is called once (before mounting) with the mount's
    :class:`Invalidator`, which the owner of the tree must call after *every*
    change (``inv(Change(...))``, under ``lock``), e.g. through
    :func:`memfs.sysfs.changes.watch_machine`.  The mount then serves from the
    kernel's page cache and caches entries (see the module's docstring).
    ``lock`` is the lock the owner holds while changing the tree (the Machine's).
    ``epoch`` picks how vanished entries are dropped: FUSE_NOTIFY_INC_EPOCH (default
    on Linux 6.16+) or one FUSE_NOTIFY_INVAL_ENTRY per name (``epoch=False``, and on
    older kernels; negative entries are then not cached).  ``page_cache=False`` keeps
    the direct way of serving texts (OPEN per access, direct_io) and only caches
    entries, with INC_EPOCH (on older kernels, without it, entries are not cached).
    """
    ops = SysfsOperations(tree, ready=ready)
    if watch is not None:
        if epoch is None:
            epoch = kernel_has_epoch()
        ops._paths = {}
        ops.inv = Invalidator(ops, mountpoint, lock, epoch)
        ops.page_cache = page_cache
        watch(ops.inv)
        if page_cache or epoch:
            options = {"entry_timeout": ENTRY_TIMEOUT,
                       "negative_timeout": ENTRY_TIMEOUT if epoch else 0, **options}
    mount_operations(ops, mountpoint, foreground=foreground, allow_other=allow_other,
                     debug=debug, **options)
