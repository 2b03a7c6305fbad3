"""The page-cache fast path (memfs/fuse.py, `memfs mount --page-cache`): never a stale read, no upcall for an
unchanged attribute, and no deadlock between writes and the invalidations they cause.

The daemon side runs in this process (tests.support.fuse's thread mode) with the same wiring as
`memfs mount`: build_tree(Machine), watch_machine() and the control Handler whose ops run
inside the invalidator's collect().  Every change path is exercised: a write to the file
read, a write to another block, the control ops plug/unplug/alloc/free, a parameter write
and auto-onlining.  After each change, every readable attribute of the tree is read
through the mount and compared with what the model shows now (its text under the model
lock): the kernel cached all of them before the change, so a missed invalidation shows.
Each test runs with FUSE_NOTIFY_INC_EPOCH (Linux 6.16+) and with it switched off (the
path of older kernels: FUSE_NOTIFY_INVAL_ENTRY per vanished name).
"""
from __future__ import annotations

import errno
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from memfs.control import Handler
from memfs.fuse import Invalidator, kernel_has_epoch
from memfs.machine.config import load_config
from memfs.machine.hotplug import Machine
from memfs.sysfs.changes import watch_machine
from memfs.sysfs.kernfs import Attr, DirNode, Tree
from memfs.sysfs.tree import build_tree
from tests.support.fuse import Mount, errno_of, fuse_unavailable, mounted

_WHY = fuse_unavailable()
pytestmark = [
    pytest.mark.skipif(_WHY is not None, reason=_WHY or ""),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (allow_other)"),
]

MEM = "sys/devices/system/memory"


@dataclass
class Served:
    """A mount of one Machine, served from this process, and its control handler."""
    mnt: Mount
    m: Machine
    tree: Tree
    inv: Invalidator
    control: Handler

    def call(self, op: str, **fields: object) -> dict:
        reply = self.control.handle_line(json.dumps({"op": op, **fields}))
        assert reply["ok"], reply
        return reply

    def path(self, rel: str) -> Path:
        return self.mnt.path / rel


def epochs() -> list[bool]:
    return [True, False] if kernel_has_epoch() else [False]


@pytest.fixture(params=epochs(), ids=lambda e: "inc_epoch" if e else "inval_entry")
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    m = Machine(load_config(None, overrides={"boot.online_policy": "auto-movable"}))
    tree = build_tree(m)
    control = Handler(m)
    got: list[Invalidator] = []

    def watch(inv: Invalidator) -> None:
        watch_machine(m, inv)
        control.around_op = inv.collect
        got.append(inv)

    with mounted(tree, tmp_path, mode="thread", watch=watch, lock=m.lock, epoch=request.param) as mnt:
        yield Served(mnt, m, tree, got[0], control)


def readable_attrs(tree: Tree) -> list[str]:
    """Every readable attribute of the tree, as a path relative to the mount."""
    out: list[str] = []

    def walk(node: DirNode, rel: str) -> None:
        for name, child in node.entries():
            path = f"{rel}/{name}" if rel else name
            if isinstance(child, DirNode):
                walk(child, path)
            elif isinstance(child, Attr) and child.readable and name != "autosuspend_delay_ms":
                out.append(path)  # (autosuspend_delay_ms fails EIO by design)
    walk(tree.root, "")
    return out


def model_texts(s: Served) -> dict[str, str]:
    """What every readable attribute shows now, in one consistent state of the model."""
    with s.m.lock:
        return {p: s.tree.resolve("/" + p).show() for p in readable_attrs(s.tree)}  # type: ignore[misc]


def mount_texts(s: Served, paths: list[str]) -> dict[str, str]:
    return {p: s.path(p).read_text() for p in paths}


def assert_fresh(s: Served) -> int:
    """Every attribute read through the mount equals the model's text; returns how many."""
    want = model_texts(s)
    got = mount_texts(s, list(want))
    stale = {p: (got[p], want[p]) for p in want if got[p] != want[p]}
    assert not stale, f"stale through the mount (got, model): {stale}"
    assert set(os.listdir(s.path(MEM))) == {n for n, _ in s.tree.resolve("/" + MEM).entries()}  # type: ignore[union-attr]
    return len(want)


def write(path: Path, text: str) -> int | None:
    """open+write+close as `echo` does; the errno of a refused write, or None."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as e:
        return e.errno
    return None


def test_never_stale_after_writes_through_the_mount(served: Served) -> None:
    s = served
    n = assert_fresh(s)  # every attribute is in the page cache now
    assert n > 300
    # the file read, itself: state, then the same block's `online` and valid_zones
    assert write(s.path(f"{MEM}/memory33/state"), "online_movable") is None
    assert s.path(f"{MEM}/memory33/state").read_text() == "online\n"
    assert_fresh(s)
    # another block: memory34's valid_zones and /proc/meminfo change with memory35's state
    assert write(s.path(f"{MEM}/memory35/online"), "1") is None
    assert_fresh(s)
    assert write(s.path(f"{MEM}/memory35/state"), "offline") is None
    assert write(s.path(f"{MEM}/memory33/online"), "0") is None
    assert_fresh(s)
    # refused writes change nothing, and nothing reads stale after them either
    assert write(s.path(f"{MEM}/memory33/state"), "offline") == errno.EINVAL
    assert write(s.path(f"{MEM}/memory33/state"), "bogus") == errno.EINVAL
    assert_fresh(s)


@pytest.mark.xfail(strict=False, reason=(
    "known race of the opt-in --page-cache mode (docs/performance.md): the page that a WRITE "
    "leaves in the kernel's cache holds the written bytes, and is dropped only by the next "
    "GETATTR's size or the invalidator's notification after the WRITE is answered; a read "
    "in between has been seen to return them (1 run in 5 on a loaded machine)"))
def test_never_stale_after_writing_bytes_that_are_not_the_text(served: Served) -> None:
    """"on" (kstrtobool) is shown as "1\n": the kernel's page, which held the written
    bytes, must not be what the next read sees."""
    s = served
    assert_fresh(s)
    assert write(s.path(f"{MEM}/memory36/online"), "on") is None
    assert s.path(f"{MEM}/memory36/online").read_text() == "1\n"
    assert_fresh(s)


def test_never_stale_after_parameter_writes(served: Served) -> None:
    s = served
    assert_fresh(s)
    params = "sys/module/memory_hotplug/parameters"
    assert write(s.path(f"{params}/online_policy"), "contig-zones") is None
    assert_fresh(s)  # every offline block's valid_zones changes with the policy
    assert write(s.path(f"{params}/online_policy"), "auto-movable") is None
    assert write(s.path(f"{params}/auto_movable_ratio"), "0") is None
    assert_fresh(s)
    assert write(s.path(f"{MEM}/auto_online_blocks"), "online_movable") is None
    assert s.path(f"{MEM}/auto_online_blocks").read_text() == "online_movable\n"
    assert_fresh(s)


def test_never_stale_after_control_ops(served: Served) -> None:
    s = served
    assert_fresh(s)
    s.call("plug", size="256M", id="dimm4")  # blocks appear (offline: memhp_default_state)
    assert_fresh(s)
    aid = s.call("alloc", kind="movable", size="64M")["allocation"]["id"]
    assert_fresh(s)  # /proc/meminfo, node meminfo, zoneinfo
    s.call("free", id=aid)
    assert_fresh(s)
    s.call("unplug", id="dimm4")  # blocks vanish
    assert_fresh(s)
    # auto-onlining: the blocks of a plug are onlined by the kernel itself
    assert write(s.path(f"{MEM}/auto_online_blocks"), "online") is None
    s.call("plug", size="128M", id="dimm5")
    bid = s.m.devices["dimm5"].block_ids[0]
    assert s.path(f"{MEM}/memory{bid}/state").read_text() == "online\n"
    assert_fresh(s)


def test_removed_blocks_vanish_and_open_files_fail_enodev(served: Served) -> None:
    s = served
    s.call("plug", size="128M", id="dimm4")
    bid = s.m.devices["dimm4"].block_ids[0]
    d = s.path(f"{MEM}/memory{bid}")
    assert (d / "state").read_text() == "offline\n"
    assert os.path.islink(s.path(f"sys/bus/memory/devices/memory{bid}"))
    fd = os.open(d / "state", os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 0) == b"offline\n"
        s.call("unplug", id="dimm4")
        assert errno_of(lambda: os.stat(d)) == errno.ENOENT
        assert errno_of(lambda: os.stat(s.path(f"sys/bus/memory/devices/memory{bid}"))) == errno.ENOENT
        assert errno_of(lambda: os.pread(fd, 100, 0)) == errno.ENODEV
    finally:
        os.close(fd)
    s.call("plug", size="128M", id="dimm4")  # and back, at once
    assert (d / "state").read_text() == "offline\n"


def test_unchanged_attribute_costs_no_upcall(served: Served) -> None:
    s = served
    state = s.path(f"{MEM}/memory33/state")
    # the first read: LOOKUPs, GETATTR, OPEN (answered ENOSYS once per mount), READ; the
    # short READ drops the cached attributes, so the next fstat asks GETATTR once more
    for _ in range(2):
        assert state.read_text() == "offline\n"
    before = dict(s.inv.ops.upcalls)
    for _ in range(100):
        with open(state) as f:
            assert f.read() == "offline\n"
    assert dict(s.inv.ops.upcalls) == before  # no READ, OPEN, LOOKUP, GETATTR or RELEASE
    # a change of another block does not drop this text either (exact invalidation)
    sent = s.inv.counts["inval_inode"]
    assert write(s.path(f"{MEM}/memory34/online"), "1") is None
    reads = s.inv.ops.upcalls["read"]
    assert state.read_text() == "offline\n"
    assert s.inv.ops.upcalls["read"] == reads
    # ... but the changed block's own texts are dropped, and only texts that changed
    assert s.inv.counts["inval_inode"] >= sent
    assert s.path(f"{MEM}/memory34/state").read_text() == "online\n"


def test_write_to_a_readonly_attribute_fails_eacces(served: Served) -> None:
    """No OPEN upcall: root's open(O_WRONLY) of a 0444 attribute succeeds, the write fails."""
    s = served
    fd = os.open(s.path(f"{MEM}/memory33/phys_index"), os.O_WRONLY)
    try:
        assert errno_of(lambda: os.write(fd, b"1")) == errno.EACCES
    finally:
        os.close(fd)
    fd = os.open(s.path(f"{MEM}/hard_offline_page"), os.O_RDONLY)  # 0200
    try:
        assert errno_of(lambda: os.read(fd, 100)) == errno.EACCES
    finally:
        os.close(fd)


def test_concurrent_writes_and_reads_do_not_deadlock(served: Served) -> None:
    """Writers of the same file, of other blocks' files and readers of everything they
    change run at once; notifications fly meanwhile.  Every thread ends (bounded), and
    afterwards nothing reads stale."""
    s = served
    assert_fresh(s)
    errors: list[BaseException] = []
    rounds = 60

    def same_file() -> None:  # two threads write the same `state`
        for i in range(rounds):
            write(s.path(f"{MEM}/memory33/state"), "online" if i % 2 else "offline")

    def other_block(bid: int) -> None:
        for i in range(rounds):
            write(s.path(f"{MEM}/memory{bid}/online"), "1" if i % 2 else "0")

    def reader() -> None:
        for _ in range(rounds):
            for bid in (33, 34, 35, 36):
                for name in ("state", "online", "valid_zones"):
                    s.path(f"{MEM}/memory{bid}/{name}").read_text()
            s.path("proc/meminfo").read_text()

    def guarded(fn: object, *args: object) -> threading.Thread:
        def body() -> None:
            try:
                fn(*args)  # type: ignore[operator]
            except BaseException as e:  # reported below
                errors.append(e)
        return threading.Thread(target=body, daemon=True)

    threads = [guarded(same_file), guarded(same_file), guarded(other_block, 34),
               guarded(other_block, 35), guarded(reader), guarded(reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not [t for t in threads if t.is_alive()], "a writer or reader hung (deadlock)"
    assert not errors, errors
    assert_fresh(s)
