"""A declarative, kernfs-like tree: directories, attributes and symlinks.

This module knows nothing about FUSE.  It only describes *what* the emulated
sysfs looks like and *how* attributes are shown and stored; :mod:`memfs.fuse`
turns a :class:`Tree` into a mounted filesystem.

Node kinds (mirroring the kernel's kernfs):

* :class:`Attr`   -- a regular file backed by ``show()``/``store(buf)``
  callbacks, like a ``struct device_attribute``.
* :class:`Link`   -- a symlink with a relative target (``../../node/node0``).
* :class:`Dir`    -- a directory with a fixed (possibly lazily built) table of
  children.
* :class:`DynDir` -- a directory defined by two callables, ``names()`` and
  ``lookup(name)``, so a directory with 65,536 ``memoryN`` entries costs O(1)
  per lookup.

Errors are reported the way the kernel does: by raising ``OSError(errno, msg)``.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Callable, Hashable, Iterable, Iterator, Mapping

__all__ = [
    "Node",
    "Attr",
    "Link",
    "DirNode",
    "Dir",
    "DynDir",
    "Tree",
    "attr_ro",
    "attr_rw",
    "attr_wo",
    "CONST",
    "OWNER",
    "GLOBAL",
    "Change",
    "NAME_MAX",
    "DIR_MODE",
    "LINK_MODE",
]

#: Longest path component, in bytes (as for every Linux filesystem).
NAME_MAX = 255
#: Permission bits of every directory and symlink (as in sysfs).
DIR_MODE = 0o755
LINK_MODE = 0o777

Show = Callable[[], str]
Store = Callable[[bytes], None]
Alive = Callable[[], bool]

#: What the text of an attribute depends on (``Attr.scope``), so that whoever caches
#: texts (the FUSE adapter keeps them in the kernel's page cache) knows which ones a
#: change may have altered: CONST never changes while the attribute exists; OWNER
#: changes only with its ``owner`` object (e.g. one memory block); GLOBAL may change
#: with anything in the model.  ``scope`` may also be a callable returning one of them
#: (valid_zones depends on its block alone while the block is online, on the zones
#: of the whole node while it is offline).
CONST = "const"
OWNER = "owner"
GLOBAL = "global"
Scope = str | Callable[[], str]


def _oserror(code: int, what: str = "") -> OSError:
    """An ``OSError`` carrying ``code`` and its standard message."""
    if what:
        return OSError(code, os.strerror(code), what)
    return OSError(code, os.strerror(code))


class Node:
    """Base class of every tree node (no behaviour of its own)."""

    __slots__ = ()


class Attr(Node):
    """A sysfs attribute (regular file).

    ``show()`` returns the whole text of the file.  ``store(buf)`` receives the
    raw bytes of one ``write(2)`` (at most 4096 bytes, never empty) and either
    returns ``None`` or raises ``OSError(errno, msg)`` with the kernel's errno.
    ``alive()`` returning false means the owning object is gone: I/O on
    handles that are still open then fails with ``ENODEV``.

    ``mode`` holds permission bits only (0o444 read-only, 0o644 read-write,
    0o200 write-only).  An attribute is readable iff it has a read bit *and* a
    ``show``; writable iff it has a write bit *and* a ``store`` -- the same
    rule sysfs uses to pick its file operations, which root cannot override.
    """

    __slots__ = ("show", "store", "mode", "alive", "readable", "writable", "owner", "scope")

    def __init__(
        self,
        show: Show | None,
        store: Store | None,
        mode: int,
        alive: Alive | None = None,
        *,
        owner: Hashable = None,
        scope: Scope = GLOBAL,
    ) -> None:
        if mode & ~0o7777:
            raise ValueError(f"Attr mode must be permission bits only, got {mode:#o}")
        self.show = show
        self.store = store
        self.mode = mode
        self.alive = alive
        # The object this attribute belongs to (None: the model itself), and what its
        # text depends on (see CONST/OWNER/GLOBAL); GLOBAL unless the table says better.
        self.owner = owner
        self.scope = scope
        # Precomputed: checked on every open().
        self.readable: bool = bool(mode & 0o444) and show is not None
        self.writable: bool = bool(mode & 0o222) and store is not None

    def is_alive(self) -> bool:
        """False once the object this attribute belongs to has been removed."""
        alive = self.alive
        return True if alive is None else bool(alive())

    def __repr__(self) -> str:
        return f"Attr(mode={self.mode:#o}, show={self.show!r}, store={self.store!r})"


def attr_ro(show: Show, alive: Alive | None = None, *, owner: Hashable = None,
            scope: Scope = GLOBAL) -> Attr:
    """Read-only attribute, mode 0444 (like ``DEVICE_ATTR_RO``)."""
    return Attr(show, None, 0o444, alive, owner=owner, scope=scope)


def attr_rw(show: Show, store: Store, alive: Alive | None = None, *, owner: Hashable = None,
            scope: Scope = GLOBAL) -> Attr:
    """Read-write attribute, mode 0644 (like ``DEVICE_ATTR_RW``)."""
    return Attr(show, store, 0o644, alive, owner=owner, scope=scope)


def attr_wo(store: Store, alive: Alive | None = None, *, owner: Hashable = None) -> Attr:
    """Write-only attribute, mode 0200 (like ``DEVICE_ATTR_WO``)."""
    return Attr(None, store, 0o200, alive, owner=owner, scope=CONST)


class Link(Node):
    """A symlink; ``target`` is relative (``../../node/node0``) or a callable
    returning it (evaluated on every ``readlink``/``stat``)."""

    __slots__ = ("_target",)

    def __init__(self, target: str | Callable[[], str]) -> None:
        self._target = target

    @property
    def target(self) -> str:
        t = self._target
        return t if isinstance(t, str) else t()

    def __repr__(self) -> str:
        return f"Link({self._target!r})"


class DirNode(Node):
    """Common interface of :class:`Dir` and :class:`DynDir`.

    ``lookup(name)`` returns the child or ``None``; ``names()`` yields the
    children's names in listing order.
    """

    __slots__ = ()

    def lookup(self, name: str) -> Node | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def names(self) -> Iterable[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def entries(self) -> Iterator[tuple[str, Node]]:
        """``(name, node)`` pairs in listing order.

        Names whose lookup fails (an entry that vanished between ``names()``
        and ``lookup()``) are skipped, as a racing readdir would in the kernel.
        """
        lookup = self.lookup
        for name in self.names():
            node = lookup(name)
            if node is not None:
                yield name, node


Entries = Mapping[str, Node]


class Dir(DirNode):
    """A directory with a fixed table of children.

    ``entries`` is a mapping name -> node, or a zero-argument callable that
    builds it; the callable runs once, on first use (thread-safe).  Listing
    order is the mapping's iteration order.
    """

    __slots__ = ("_entries", "_factory", "_lock")

    def __init__(self, entries: Entries | Callable[[], Entries] | None = None) -> None:
        self._lock = threading.Lock()
        if entries is None:
            self._entries: dict[str, Node] | None = {}
            self._factory: Callable[[], Entries] | None = None
        elif callable(entries):
            self._entries = None
            self._factory = entries
        else:
            self._entries = dict(entries)
            self._factory = None

    def _table(self) -> dict[str, Node]:
        table = self._entries
        if table is None:
            with self._lock:
                table = self._entries
                if table is None:
                    assert self._factory is not None
                    table = self._entries = dict(self._factory())
                    self._factory = None
        return table

    def lookup(self, name: str) -> Node | None:
        return self._table().get(name)

    def names(self) -> Iterable[str]:
        return list(self._table())

    def add(self, name: str, node: Node) -> Node:
        """Add (or replace) a child; returns ``node`` for chaining."""
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"invalid directory entry name {name!r}")
        self._table()[name] = node
        return node

    def __repr__(self) -> str:
        if self._entries is None:
            return "Dir(<lazy>)"
        return f"Dir({list(self._entries)!r})"


class DynDir(DirNode):
    """A directory defined by callables: ``names()`` (listing, in order) and
    ``lookup(name)`` (child or ``None``).

    Path resolution only ever calls ``lookup``, so its cost is whatever
    ``lookup`` costs -- typically a dict or range check, O(1).
    """

    __slots__ = ("names", "lookup")

    def __init__(
        self,
        names: Callable[[], Iterable[str]],
        lookup: Callable[[str], Node | None],
    ) -> None:
        # Instance attributes shadow the DirNode methods: a direct call, no
        # extra frame on the hot path.
        self.names = names  # type: ignore[method-assign]
        self.lookup = lookup  # type: ignore[method-assign]

    def __repr__(self) -> str:
        return f"DynDir(names={self.names!r}, lookup={self.lookup!r})"


class Tree:
    """A rooted tree of nodes with cheap, non-following path resolution."""

    __slots__ = ("root",)

    def __init__(self, root: DirNode | Mapping[str, Node]) -> None:
        if isinstance(root, DirNode):
            self.root: DirNode = root
        else:
            self.root = Dir(root)

    def resolve(self, path: str) -> Node:
        """Return the node at absolute ``path`` (e.g. ``/sys/devices/system``).

        ``""`` and ``"/"`` are the root.  Only directories are walked:
        symlinks in intermediate components are *not* followed (FUSE's kernel
        side does that through ``readlink``) and give ``ENOTDIR``, like a
        regular file would.  ``"."``/``".."`` are not special (FUSE hands us
        normalized paths).  Raises ``OSError`` with ``ENOENT``, ``ENOTDIR`` or
        ``ENAMETOOLONG``.
        """
        node: Node = self.root
        if len(path) <= 1:  # "" or "/"
            return node
        for name in path.split("/"):
            if not name:  # leading "/" (and tolerated "//")
                continue
            # A str longer than 63 chars may exceed 255 bytes in UTF-8;
            # shorter ones cannot, so encoding is skipped on the common path.
            if len(name) > 63 and len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
                raise _oserror(errno.ENAMETOOLONG, path)
            if not isinstance(node, DirNode):
                raise _oserror(errno.ENOTDIR, path)
            child = node.lookup(name)
            if child is None:
                raise _oserror(errno.ENOENT, path)
            node = child
        return node


class Change:
    """What one change of the model did to the tree, for whoever caches it (memfs.fuse).

    ``owners``: objects (``Attr.owner``) whose OWNER-scoped attributes may show new text;
    ``removed``: objects that are gone (every attribute of theirs is dead);
    ``entries``: paths (``sys/devices/system/memory/memory9``) that appeared or vanished,
    or None when the tree's shape may have changed anywhere;
    ``everything``: GLOBAL-scoped attributes may show new text.
    """

    __slots__ = ("owners", "removed", "entries", "everything")

    def __init__(self, owners: Iterable[Hashable] = (), removed: Iterable[Hashable] = (),
                 entries: Iterable[str] | None = (), everything: bool = False) -> None:
        self.owners = frozenset(owners)
        self.removed = frozenset(removed)
        self.entries = None if entries is None else tuple(entries)
        self.everything = everything

    def __repr__(self) -> str:
        return (f"Change(owners={set(self.owners)!r}, removed={set(self.removed)!r}, "
                f"entries={self.entries!r}, everything={self.everything})")


def bus_dir(devices: DynDir) -> Dir:
    """A bus type's directory, /sys/bus/NAME (drivers/base/bus.c bus_register()): the
    devices' links plus drivers/ and the bus's own files, which memfs accepts and ignores."""
    return Dir({
        "devices": devices,
        "drivers": Dir({}),
        "drivers_autoprobe": attr_rw(lambda: "1\n", lambda b: None),
        "drivers_probe": attr_wo(lambda b: None),
        "uevent": attr_wo(lambda b: None),
    })

