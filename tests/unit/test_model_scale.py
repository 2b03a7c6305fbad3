"""Cost flat in the number of blocks: counted operations, not time.

A machine with 65,536 memory blocks (8 TiB of boot RAM in 128 MiB blocks). The model's
block table is swapped for a dict that counts every walk over it, and block_ids() (a
sorted list of all blocks) is made to fail: onlining, offlining, valid_zones, add,
eject, migration and sysfs lookups must never walk all blocks. The kernel keeps blocks in
an xarray and zones by span, so none of these operations is O(blocks) there either.
"""
from __future__ import annotations

import tomllib

import pytest

from memfs.machine.config import from_dict
from memfs.machine.hotplug import Machine
from memfs.sysfs.tree import build_tree

MEM = "/sys/devices/system/memory"
MiB, GiB = 1 << 20, 1 << 30
PPB = 32768
N_BLOCKS = 65536

BIG = """
kernel = "6.1"
block_size = "128M"
[hotplug]
base = "8T"
size = "16G"
slots = 8
[boot]
memmap_on_memory = true
[[node]]
id = 0
ram = ["0x100000-0x80000000000"]
"""


class CountingDict(dict):
    """A dict that counts walks over its contents (iteration, keys/values/items, copies)."""

    walks = 0

    def _walk(self):
        type(self).walks += 1

    def __iter__(self):
        self._walk()
        return super().__iter__()

    def keys(self):
        self._walk()
        return super().keys()

    def values(self):
        self._walk()
        return super().values()

    def items(self):
        self._walk()
        return super().items()

    def copy(self):
        self._walk()
        return super().copy()


@pytest.fixture(scope="module")
def big() -> Machine:
    m = Machine(from_dict(tomllib.loads(BIG)))
    assert len(m.blocks) == N_BLOCKS
    return m


@pytest.fixture
def counted(big, monkeypatch):
    CountingDict.walks = 0
    monkeypatch.setattr(big, "blocks", CountingDict(big.blocks))

    def no_block_ids():
        raise AssertionError("block_ids() walks all 65,536 blocks")

    monkeypatch.setattr(big, "block_ids", no_block_ids)
    yield big
    assert CountingDict.walks == 0, f"{CountingDict.walks} walks over all blocks"


def store(tree, path: str, data: bytes) -> None:
    tree.resolve(path).store(data)


def test_counting_dict_catches_walks():
    d = CountingDict({1: 2})
    CountingDict.walks = 0
    list(d), sorted(d), d.values(), any(k for k in d)
    assert CountingDict.walks == 4
    CountingDict.walks = 0
    d.get(1), 1 in d, len(d), d[1]
    assert CountingDict.walks == 0


def test_online_offline_valid_zones_never_walk_all_blocks(counted):
    m = counted
    tree = build_tree(m)
    dev = m.plug(GiB, dev_id="d")  # 8 blocks above 8 TiB
    a, b, c = dev.block_ids[:3]
    assert tree.resolve(f"{MEM}/memory{a}/valid_zones").show() == "Normal Movable\n"
    store(tree, f"{MEM}/memory{a}/state", b"online_movable")
    store(tree, f"{MEM}/memory{b}/online", b"1")
    store(tree, f"{MEM}/memory{c}/state", b"online_movable")
    assert tree.resolve(f"{MEM}/memory{b}/valid_zones").show() == "Normal\n"
    assert tree.resolve(f"{MEM}/memory{a}/state").show() == "online\n"
    # movable pages migrate off a block on offline
    m.alloc("movable", 64 * MiB, block_id=a)
    store(tree, f"{MEM}/memory{a}/state", b"offline")
    store(tree, f"{MEM}/memory{c}/online", b"0")
    store(tree, f"{MEM}/memory{b}/state", b"offline")
    # boot blocks in the middle of Normal and at its high edge
    for bid in (40000, N_BLOCKS - 1, 40001):
        store(tree, f"{MEM}/memory{bid}/state", b"offline")
    normal = m.nodes[0].zone("Normal")
    assert normal.end_pfn == (N_BLOCKS - 1) * PPB  # high edge shrank by one block, bisect, no scan
    assert tree.resolve(f"{MEM}/memory40000/valid_zones").show() == "Normal Movable\n"
    for bid in (40000, N_BLOCKS - 1, 40001):
        store(tree, f"{MEM}/memory{bid}/state", b"online")
    assert normal.end_pfn == N_BLOCKS * PPB
    # a DMA32 boot block (offline in the middle, then back)
    store(tree, f"{MEM}/memory5/state", b"offline")
    assert tree.resolve(f"{MEM}/memory5/valid_zones").show() == "DMA32 Movable\n"
    store(tree, f"{MEM}/memory5/state", b"online_kernel")


def test_auto_movable_and_eject_never_walk_all_blocks(counted):
    m = counted
    tree = build_tree(m)
    store(tree, "/sys/module/memory_hotplug/parameters/online_policy", b"auto-movable")
    dev = m.plug(256 * MiB, dev_id="e")
    x, y = dev.block_ids
    assert tree.resolve(f"{MEM}/memory{x}/valid_zones").show() == "Movable Normal\n"
    store(tree, f"{MEM}/memory{x}/online", b"1")
    store(tree, f"{MEM}/memory{y}/online", b"1")
    m.acpi_eject("e")
    assert "e" not in m.devices
    store(tree, "/sys/module/memory_hotplug/parameters/online_policy", b"contig-zones")


def test_zone_members_stay_sorted_and_complete(big):
    normal = big.nodes[0].zone("Normal")
    members = normal.members
    assert members == sorted(members)
    assert len(members) == N_BLOCKS - 32  # every boot block above 4 GiB
