"""serve(watch=...): the kernel caches entries, and every model change drops them at once.

The toy tree's `blocks` directory gains and loses `memoryN` entries through
control attributes; each change calls the invalidation callable that serve()
handed to `watch`, exactly as a model's change listener would.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable, Iterator

import pytest

from memfs.fuse import kernel_has_epoch
from memfs.sysfs.kernfs import Dir, DynDir, Tree, attr_ro, attr_wo
from tests.support.fuse import Mount, errno_of, fuse_unavailable, mounted

_WHY = fuse_unavailable()
pytestmark = [
    pytest.mark.skipif(_WHY is not None, reason=_WHY or ""),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (allow_other)"),
    pytest.mark.skipif(not kernel_has_epoch(), reason="FUSE_NOTIFY_INC_EPOCH needs Linux 6.16+"),
]


class Blocks:
    def __init__(self) -> None:
        self.present = {0, 1}
        self.lookups = 0
        self.listeners: list[Callable[[], object]] = []
        self.dirs: dict[int, Dir] = {}

    def watch(self, listener: Callable[[], object]) -> None:
        self.listeners.append(listener)

    def _changed(self) -> None:
        for cb in self.listeners:
            cb()

    def _add(self, buf: bytes) -> None:
        self.present.add(int(buf))
        self._changed()

    def _remove(self, buf: bytes) -> None:
        self.present.discard(int(buf))
        self._changed()

    def _lookup(self, name: str):
        self.lookups += 1
        if not name.startswith("memory") or not name[6:].isdigit():
            return None
        i = int(name[6:])
        if i not in self.present:
            return None
        if i not in self.dirs:
            self.dirs[i] = Dir({"state": attr_ro(lambda: "online\n",
                                                 alive=lambda: i in self.present)})
        return self.dirs[i]

    def tree(self) -> Tree:
        return Tree(Dir({"sys": Dir({
            "blocks": DynDir(lambda: [f"memory{i}" for i in sorted(self.present)], self._lookup),
            "add": attr_wo(self._add),
            "remove": attr_wo(self._remove),
            "lookups": attr_ro(lambda: f"{self.lookups}\n"),
        })}))


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Mount]:
    b = Blocks()
    with mounted(b.tree, tmp_path, watch=b.watch) as m:
        yield m


def lookups(m: Mount) -> int:
    return int((m / "sys/lookups").read_text())


def write(m: Mount, name: str, value: int) -> None:
    fd = os.open(m / "sys" / name, os.O_WRONLY)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def test_entries_are_cached(mnt: Mount) -> None:
    os.stat(mnt / "sys/blocks/memory0/state")
    before = lookups(mnt)
    for _ in range(20):
        os.stat(mnt / "sys/blocks/memory0/state")
        os.stat(mnt / "sys/blocks/memory0")
    # neither LOOKUP nor GETATTR reached the tree (reading `lookups` resolves
    # its own path only, outside `blocks`)
    assert lookups(mnt) == before


def test_appear_and_vanish_at_once(mnt: Mount) -> None:
    p = mnt / "sys/blocks/memory5"
    assert errno_of(lambda: os.stat(p)) == errno.ENOENT  # negative entry cached now
    assert errno_of(lambda: os.stat(p)) == errno.ENOENT
    write(mnt, "add", 5)
    assert (p / "state").read_text() == "online\n"
    assert "memory5" in os.listdir(mnt / "sys/blocks")
    write(mnt, "remove", 5)
    assert errno_of(lambda: os.stat(p)) == errno.ENOENT
    assert errno_of(lambda: os.stat(p / "state")) == errno.ENOENT
    assert "memory5" not in os.listdir(mnt / "sys/blocks")
    write(mnt, "add", 5)
    assert os.path.isdir(p)


def test_pinned_entries_vanish_too(mnt: Mount) -> None:
    """An open file and a working directory inside a block do not keep it visible."""
    d = mnt / "sys/blocks/memory1"
    fd = os.open(d / "state", os.O_RDONLY)
    cwd = os.open(".", os.O_RDONLY)
    try:
        os.chdir(d)
        os.stat("state")
        write(mnt, "remove", 1)
        assert errno_of(lambda: os.stat(d)) == errno.ENOENT
        assert errno_of(lambda: os.stat(d / "state")) == errno.ENOENT
        assert errno_of(lambda: os.stat("state")) == errno.ENOENT
        assert errno_of(lambda: os.pread(fd, 100, 0)) == errno.ENODEV
    finally:
        os.fchdir(cwd)
        os.close(cwd)
        os.close(fd)
