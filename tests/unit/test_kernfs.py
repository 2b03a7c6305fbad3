"""Unit tests of the declarative kernfs tree (no FUSE involved)."""

from __future__ import annotations

import errno
import threading

import pytest

from memfs.sysfs.kernfs import (
    DIR_MODE,
    LINK_MODE,
    Attr,
    Dir,
    DirNode,
    DynDir,
    Link,
    Tree,
    attr_ro,
    attr_rw,
    attr_wo,
)


def _show() -> str:
    return "x\n"


def _store(buf: bytes) -> None:
    return None


N_BLOCKS = 65536


class _Blocks:
    """A DynDir backend with 65,536 `memoryN` entries that forbids listing
    while a lookup is in progress (and counts calls)."""

    def __init__(self) -> None:
        self.names_calls = 0
        self.lookup_calls = 0
        self.state = attr_ro(lambda: "online\n")
        self.dirs: dict[int, Dir] = {}

    def names(self):
        self.names_calls += 1
        return (f"memory{i}" for i in range(N_BLOCKS))

    def lookup(self, name: str):
        self.lookup_calls += 1
        if not name.startswith("memory") or not name[6:].isdigit():
            return None
        i = int(name[6:])
        if i >= N_BLOCKS or name != f"memory{i}":
            return None
        d = self.dirs.get(i)
        if d is None:
            d = self.dirs[i] = Dir({"state": self.state})
        return d


def _forbidden_names():
    raise AssertionError("names() must not be called during path resolution")


@pytest.fixture
def blocks() -> _Blocks:
    return _Blocks()


@pytest.fixture
def tree(blocks: _Blocks) -> Tree:
    ro = attr_ro(_show)
    memory = DynDir(_forbidden_names, blocks.lookup)
    return Tree(Dir({
        "sys": Dir({
            "devices": Dir({
                "system": Dir({
                    "memory": memory,
                    "node": Dir({"node0": Dir({"meminfo": ro})}),
                }),
            }),
            "ro": ro,
            "link": Link("devices/system/node/node0"),
        }),
    }))


class TestResolve:
    def test_root(self, tree: Tree) -> None:
        assert tree.resolve("/") is tree.root
        assert tree.resolve("") is tree.root

    def test_nested_paths(self, tree: Tree, blocks: _Blocks) -> None:
        assert isinstance(tree.resolve("/sys"), Dir)
        assert isinstance(tree.resolve("/sys/devices/system/memory"), DynDir)
        state = tree.resolve("/sys/devices/system/memory/memory32/state")
        assert state is blocks.state
        assert tree.resolve("/sys/devices/system/node/node0/meminfo").show() == "x\n"

    def test_trailing_and_double_slashes_tolerated(self, tree: Tree) -> None:
        assert tree.resolve("/sys/") is tree.resolve("/sys")
        assert tree.resolve("//sys//ro") is tree.resolve("/sys/ro")

    def test_relative_path_from_root(self, tree: Tree) -> None:
        assert tree.resolve("sys/ro") is tree.resolve("/sys/ro")

    @pytest.mark.parametrize("path", [
        "/nope", "/sys/nope", "/sys/devices/system/memory/memory65536",
        "/sys/devices/system/memory/memory32/nope", "/sys/devices/system/memory/memoryx",
        "/sys/devices/system/memory/memory032",
    ])
    def test_enoent(self, tree: Tree, path: str) -> None:
        with pytest.raises(OSError) as ei:
            tree.resolve(path)
        assert ei.value.errno == errno.ENOENT
        assert ei.value.filename == path

    def test_dot_components_not_special(self, tree: Tree) -> None:
        for path in ("/sys/.", "/sys/..", "/sys/devices/../ro"):
            with pytest.raises(OSError) as ei:
                tree.resolve(path)
            assert ei.value.errno == errno.ENOENT

    def test_through_file_is_enotdir(self, tree: Tree) -> None:
        with pytest.raises(OSError) as ei:
            tree.resolve("/sys/ro/x")
        assert ei.value.errno == errno.ENOTDIR

    def test_symlinks_not_followed_in_intermediate_components(self, tree: Tree) -> None:
        assert isinstance(tree.resolve("/sys/link"), Link)
        with pytest.raises(OSError) as ei:
            tree.resolve("/sys/link/meminfo")
        assert ei.value.errno == errno.ENOTDIR

    def test_enametoolong(self, tree: Tree) -> None:
        with pytest.raises(OSError) as ei:
            tree.resolve("/sys/" + "a" * 256)
        assert ei.value.errno == errno.ENAMETOOLONG
        # 255 bytes is fine (just absent)
        with pytest.raises(OSError) as ei:
            tree.resolve("/sys/" + "a" * 255)
        assert ei.value.errno == errno.ENOENT
        # bytes, not characters: 64 x 4-byte chars = 256 bytes
        with pytest.raises(OSError) as ei:
            tree.resolve("/sys/" + "\U0001F600" * 64)
        assert ei.value.errno == errno.ENAMETOOLONG
        with pytest.raises(OSError) as ei:
            tree.resolve("/sys/" + "\U0001F600" * 63)
        assert ei.value.errno == errno.ENOENT

    def test_enametoolong_checked_even_below_missing_dir(self, tree: Tree) -> None:
        with pytest.raises(OSError) as ei:
            tree.resolve("/" + "b" * 300 + "/x")
        assert ei.value.errno == errno.ENAMETOOLONG


class TestDynDir:
    def test_lookup_is_o1_and_never_lists(self, tree: Tree, blocks: _Blocks) -> None:
        # names() raises if called: resolution must only use lookup().
        for i in (0, 1, 32, 65535):
            tree.resolve(f"/sys/devices/system/memory/memory{i}/state")
        assert blocks.lookup_calls == 4
        assert blocks.names_calls == 0

    def test_listing_uses_names_then_lookup(self, blocks: _Blocks) -> None:
        d = DynDir(blocks.names, blocks.lookup)
        names = list(d.names())
        assert len(names) == N_BLOCKS
        assert names[:3] == ["memory0", "memory1", "memory2"]
        entries = list(d.entries())
        assert len(entries) == N_BLOCKS
        assert entries[7][0] == "memory7" and isinstance(entries[7][1], Dir)

    def test_entries_skips_vanished_names(self) -> None:
        present = {"memory0": attr_ro(_show)}
        d = DynDir(lambda: ["memory0", "memory1"], present.get)
        assert [n for n, _ in d.entries()] == ["memory0"]

    def test_dyndir_is_a_dirnode(self, blocks: _Blocks) -> None:
        assert isinstance(DynDir(blocks.names, blocks.lookup), DirNode)
        assert isinstance(Dir(), DirNode)

    def test_resolve_cost_scales_with_depth_not_size(self) -> None:
        calls = []

        def lookup(name: str):
            calls.append(name)
            return attr_ro(_show) if name == "memory999999" else None

        t = Tree(Dir({"m": DynDir(_forbidden_names, lookup)}))
        t.resolve("/m/memory999999")
        assert calls == ["memory999999"]


class TestDir:
    def test_listing_order_is_insertion_order(self) -> None:
        d = Dir({"b": attr_ro(_show), "a": attr_ro(_show), "c": Dir()})
        assert list(d.names()) == ["b", "a", "c"]
        assert [n for n, _ in d.entries()] == ["b", "a", "c"]

    def test_lazy_factory_runs_once(self) -> None:
        runs = []

        def build():
            runs.append(1)
            return {"x": attr_ro(_show)}

        d = Dir(build)
        assert runs == []
        t = Tree(Dir({"d": d}))
        assert isinstance(t.resolve("/d/x"), Attr)
        assert list(d.names()) == ["x"]
        assert d.lookup("y") is None
        assert runs == [1]

    def test_lazy_factory_thread_safe(self) -> None:
        runs = []
        barrier = threading.Barrier(8)

        def build():
            runs.append(1)
            return {"x": attr_ro(_show)}

        d = Dir(build)
        results = []

        def worker():
            barrier.wait()
            results.append(d.lookup("x"))

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        assert runs == [1]
        assert len(results) == 8 and all(r is results[0] for r in results)

    def test_add(self) -> None:
        d = Dir()
        a = attr_ro(_show)
        assert d.add("a", a) is a
        assert d.lookup("a") is a
        for bad in ("", ".", "..", "x/y"):
            with pytest.raises(ValueError):
                d.add(bad, a)

    def test_tree_accepts_mapping_root(self) -> None:
        a = attr_ro(_show)
        t = Tree({"a": a})
        assert isinstance(t.root, Dir)
        assert t.resolve("/a") is a


class TestAttrAndLink:
    def test_helper_modes(self) -> None:
        ro, rw, wo = attr_ro(_show), attr_rw(_show, _store), attr_wo(_store)
        assert (ro.mode, rw.mode, wo.mode) == (0o444, 0o644, 0o200)
        assert (ro.readable, ro.writable) == (True, False)
        assert (rw.readable, rw.writable) == (True, True)
        assert (wo.readable, wo.writable) == (False, True)
        assert ro.store is None and wo.show is None
        assert rw.show is _show and rw.store is _store

    def test_access_needs_both_mode_bit_and_callback(self) -> None:
        # A write bit without a store (or vice versa) is not writable: sysfs
        # refuses such opens even to root.
        a = Attr(_show, None, 0o644)
        assert a.readable and not a.writable
        b = Attr(_show, _store, 0o444)
        assert b.readable and not b.writable
        c = Attr(None, _store, 0o644)
        assert not c.readable and c.writable

    def test_mode_must_be_permission_bits(self) -> None:
        with pytest.raises(ValueError):
            Attr(_show, None, 0o100444)

    def test_alive(self) -> None:
        flag = [True]
        a = attr_rw(_show, _store, alive=lambda: flag[0])
        assert a.is_alive()
        flag[0] = False
        assert not a.is_alive()
        assert attr_ro(_show).is_alive()  # no alive callback: always alive
        assert attr_wo(_store, alive=lambda: False).is_alive() is False

    def test_store_errors_propagate_as_oserror(self) -> None:
        def store(buf: bytes) -> None:
            raise OSError(errno.EINVAL, "bad value")

        a = attr_wo(store)
        with pytest.raises(OSError) as ei:
            a.store(b"x")  # type: ignore[misc]
        assert ei.value.errno == errno.EINVAL

    def test_link_static_and_callable(self) -> None:
        assert Link("../../node/node0").target == "../../node/node0"
        targets = iter(["../a", "../b"])
        link = Link(lambda: next(targets))
        assert link.target == "../a"
        assert link.target == "../b"

    def test_constants(self) -> None:
        assert DIR_MODE == 0o755 and LINK_MODE == 0o777
