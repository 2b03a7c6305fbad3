"""Thin fusepy adapter: serve a :class:`memfs.sysfs.kernfs.Tree` as a mount.

All semantics come from the tree; this module only maps FUSE operations to
``Tree.resolve`` and the node callbacks, with sysfs-like behaviour:

* attributes are ``S_IFREG`` with ``st_size`` 4096 whatever their content;
* opening takes a snapshot of ``show()``; reads are served from it, and a read
  at offset 0 after the handle has already returned data regenerates it
  (like seq_file after ``lseek(fd, 0, SEEK_SET)``);
* every ``write(2)`` is one complete ``store()`` of (at most 4096 bytes of)
  its buffer, whatever the file offset;
* an attribute whose ``alive()`` turned false fails I/O with ``ENODEV``;
* the namespace is immutable from userspace (create/mkdir/unlink/... fail).

Any unexpected exception is logged and turned into ``EIO``.
"""

from __future__ import annotations

import errno
import itertools
import logging
import ctypes
import os
import platform
import re
import stat
import struct
import threading
import time
from typing import Any, Callable, Iterator

import fuse as _fusepy  # fusepy (top-level module "fuse"), not this module

from memfs.sysfs.kernfs import Attr, DirNode, Link, Node, Tree

__all__ = ["SysfsOperations", "serve", "kernel_has_epoch", "ENTRY_TIMEOUT", "ATTR_TIMEOUT", "mount_operations", "default_options", "load_binding",
           "BINDINGS", "STORE_MAX", "ATTR_SIZE"]

log = logging.getLogger(__name__)

#: Longest buffer handed to ``store()`` (sysfs truncates writes to PAGE_SIZE).
STORE_MAX = 4096
#: ``st_size`` of every attribute (sysfs reports PAGE_SIZE, not the content size).
ATTR_SIZE = 4096

#: Seconds the kernel may cache a node's attributes (see :func:`default_options`).
ATTR_TIMEOUT = 3600
#: Seconds the kernel may cache directory entries when :func:`serve` is given a
#: ``watch`` (the model then tells the adapter about every change, and the
#: adapter drops the kernel's entries at once: see :meth:`SysfsOperations.invalidate`).
ENTRY_TIMEOUT = 3600
#: enum fuse_notify_code FUSE_NOTIFY_INC_EPOCH (Linux 6.16+): every dentry created
#: (or whose LOOKUP started) before the bump is invalid on its next use.
FUSE_NOTIFY_INC_EPOCH = 8
_EPOCH_MSG = struct.pack("<IiQ", 16, FUSE_NOTIFY_INC_EPOCH, 0)  # struct fuse_out_header
_PATH_CACHE_MAX = 1 << 20  # entries; a full listing of 65,536 blocks x 12 files fits

_O_ACCMODE = os.O_ACCMODE


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


class SysfsOperations(_fusepy.Operations):
    """fusepy ``Operations`` serving a :class:`Tree` with sysfs semantics."""

    use_ns = True  # timestamps in integer nanoseconds (silences fusepy warning)

    def __init__(self, tree: Tree, *, ready: Callable[[], None] | None = None,
                 binding: Any = None) -> None:
        self.tree = tree
        self._ready = ready
        self._binding = binding if binding is not None else _fusepy
        self._dev_fd: int | None = None  # /dev/fuse, once mounted, if entries are cached
        self.entry_cache = False  # set by serve() when the kernel may cache entries
        # path -> node, kept only while the tree's owner reports changes (serve(watch=)):
        # each FUSE request carries a full path, and resolving it again costs a lookup
        # per component. Cleared by invalidate(); `_path_gen` keeps a resolve that raced
        # with a change from caching what it found before the change.
        self._paths: dict[str, Node] | None = None
        self._path_gen = 0
        self._handles: dict[int, _Handle] = {}
        self._lock = threading.Lock()
        self._fh_counter = itertools.count(1)
        now = time.time_ns()
        self._times = {"st_atime": now, "st_mtime": now, "st_ctime": now}
        self._dir_stat = self._mkstat(stat.S_IFDIR | 0o755, 2, 0)
        self._attr_stats: dict[int, dict[str, int]] = {}
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
        if self.entry_cache:
            try:
                self._dev_fd = _session_fd(self._binding)
            except Exception as e:  # pragma: no cover - libfuse without the symbols
                log.error("memfs: cannot reach /dev/fuse to invalidate entries (%s); "
                          "cached entries may go stale", e)
            else:
                self.invalidate()
        ready = self._ready
        if ready is not None:
            self._ready = None
            try:
                ready()
            except Exception:  # init may not fail; just report it
                log.exception("memfs: ready() callback failed")

    def destroy(self, path: str) -> None:
        self._dev_fd = None
        with self._lock:
            self._handles.clear()

    def invalidate(self) -> bool:
        """Make every directory entry the kernel has cached for this mount stale.

        Called (through ``serve(watch=...)``) after every change of the model,
        before the operation that made it returns: the next path walk then asks
        the daemon again, so blocks appear and vanish at once, even for
        dentries pinned by open files or working directories, and even if a
        LOOKUP raced with the change (the kernel records the epoch a LOOKUP
        started in).  One write of a 16-byte notification; no locks taken in
        the kernel, so it is safe from any thread, with or without the model's
        lock held.  Returns False when entries are not cached (nothing to do).
        """
        if self._paths is not None:
            with self._lock:
                self._path_gen += 1
                self._paths = {}
        fd = self._dev_fd
        if fd is None:
            return False
        try:
            os.write(fd, _EPOCH_MSG)
        except OSError as e:
            log.error("memfs: FUSE_NOTIFY_INC_EPOCH failed: %s; cached entries may be stale", e)
            return False
        return True

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
        return self._stat(self._resolve(path))

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

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
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
        h = self._handle(fh)
        attr = h.attr
        if not attr.is_alive():
            raise _err(errno.ENODEV)
        n = len(data)
        if n == 0:
            return 0
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

    def utimens(self, path: str, times: Any = None) -> int:
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


#: Bindings :func:`serve` can run on (``MEMFS_FUSE_BINDING`` picks the default).
#: ``mfusepy`` (libfuse 3 through the maintained fusepy fork) is an experimental
#: prototype for the benchmark: ``pip install mfusepy`` and Debian's libfuse3-3.
BINDINGS = ("fusepy", "mfusepy")


def load_binding(name: str | None = None) -> Any:
    """The fusepy-compatible module for binding ``name`` (default: $MEMFS_FUSE_BINDING or fusepy)."""
    name = name or os.environ.get("MEMFS_FUSE_BINDING") or "fusepy"
    if name == "fusepy":
        return _fusepy
    if name == "mfusepy":
        # mfusepy picks libfuse 2 when both are installed, unless told otherwise
        os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
        import mfusepy  # type: ignore[import-not-found]
        return mfusepy
    raise ValueError(f"unknown FUSE binding {name!r}; choose one of {', '.join(BINDINGS)}")


class _Dispatch:
    """Expose ``ops(name, *args)`` as methods, for bindings that ignore ``__call__`` (mfusepy 3).

    Only the operations ``ops`` implements (non-None) are exposed, so the
    binding registers exactly the same table as fusepy does.
    """

    def __init__(self, ops: Any) -> None:
        self.use_ns = getattr(ops, "use_ns", False)
        for name in dir(type(ops)):
            if name.startswith("_") or name in ("use_ns", "tree", "entry_cache", "invalidate"):
                continue
            attr = getattr(ops, name, None)
            if callable(attr):
                setattr(self, name, self._bind(ops, name))

    @staticmethod
    def _bind(ops: Any, name: str) -> Callable[..., Any]:
        def method(*args: Any) -> Any:
            return ops(name, *args)
        method.__name__ = name
        return method


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
    import codecs

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


def mount_operations(ops: Any, mountpoint: str, *, binding: str | None = None,
                     foreground: bool = True, allow_other: bool | None = None,
                     debug: bool = False, **options: Any) -> None:
    """Mount any fusepy-style ``Operations`` with memfs's options (blocks until unmounted)."""
    mod = load_binding(binding)
    opts = default_options(allow_other)
    opts.setdefault("encoding", path_encoding())
    opts.update(options)
    if getattr(mod, "fuse_version_major", 2) >= 3:
        opts.pop("big_writes", None)  # always on, and refused, in libfuse 3
    if mod is not _fusepy:
        ops = _Dispatch(ops)
    mod.FUSE(ops, mountpoint, foreground=foreground, nothreads=False, debug=debug, **opts)


def kernel_has_epoch(release: str | None = None) -> bool:
    """True if this kernel takes FUSE_NOTIFY_INC_EPOCH (Linux 6.16 and later)."""
    m = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (6, 16)


def _session_fd(binding: Any) -> int:
    """The /dev/fuse descriptor of the session serving the current request (from init())."""
    lib = binding._libfuse
    ctx = lib.fuse_get_context()
    f = ctypes.c_void_p(ctx.contents.fuse)
    lib.fuse_get_session.restype = ctypes.c_void_p
    lib.fuse_get_session.argtypes = [ctypes.c_void_p]
    se = ctypes.c_void_p(lib.fuse_get_session(f))
    if hasattr(lib, "fuse_session_fd"):  # libfuse 3
        lib.fuse_session_fd.restype = ctypes.c_int
        lib.fuse_session_fd.argtypes = [ctypes.c_void_p]
        fd = lib.fuse_session_fd(se)
    else:  # libfuse 2: the session's only channel
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
    binding: str | None = None,
    watch: Callable[[Callable[[], bool]], None] | None = None,
    **options: Any,
) -> None:
    """Mount ``tree`` at ``mountpoint`` and serve it until unmounted.

    Blocks (with ``foreground=True``) until ``fusermount -u`` or a signal.
    ``allow_other`` defaults to True when running as root.  ``ready()`` is
    called once, from a FUSE thread, when the kernel has completed the mount
    handshake and requests are being served.  Extra ``options`` are passed to
    libfuse as ``-o key=value`` (``True`` for bare flags) and override
    :func:`default_options`.  ``binding`` picks the FUSE binding (see
    :func:`load_binding`).

    ``watch``, if given, is called once (before mounting) with a callable that
    the owner of the tree must call after *every* change of what the tree
    resolves (blocks or nodes appearing or vanishing), before the change is
    reported done; e.g. ``watch=lambda inval: machine_listeners.append(inval)``.
    The kernel may then cache directory entries (``entry_timeout`` and
    ``negative_timeout`` of :data:`ENTRY_TIMEOUT`), which saves one LOOKUP
    round trip per path component per access.  Without ``watch``, or on a
    kernel older than 6.16, entries are never cached (timeouts 0).
    """
    mod = load_binding(binding)
    ops = SysfsOperations(tree, ready=ready, binding=mod)
    if watch is not None:
        ops._paths = {}
        watch(ops.invalidate)
    if watch is not None and kernel_has_epoch():
        ops.entry_cache = True
        options = {"entry_timeout": ENTRY_TIMEOUT, "negative_timeout": ENTRY_TIMEOUT, **options}
    mount_operations(ops, mountpoint, binding=binding, foreground=foreground,
                     allow_other=allow_other, debug=debug, **options)
