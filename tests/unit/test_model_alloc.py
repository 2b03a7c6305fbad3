"""Allocations: what makes offlining fail (mm/memory_hotplug.c offline_pages()) and placement determinism.

Unmovable pages in the range -> offline_pages() fails to isolate: EBUSY, state back to
online, nothing changed, no uevent. Movable pages are migrated (do_migrate_range) when
there is room elsewhere; without room the offline fails EBUSY (the emulator does not loop
forever). ZONE_MOVABLE takes movable allocations only.
"""
from __future__ import annotations

import errno

import pytest

from memfs.machine.config import load_config
from memfs.machine.hotplug import Machine
from memfs.sysfs.tree import build_tree

MEM = "/sys/devices/system/memory"
MiB = 1 << 20
PPB = 32768


def machine(kernel: str = "6.1", **overrides) -> Machine:
    ov = {"boot.memmap_on_memory": False}
    ov.update(overrides)
    return Machine(load_config(None, overrides=ov, kernel=kernel))


def store(m: Machine, bid: int, attr: str, data: bytes) -> int | None:
    try:
        build_tree(m).resolve(f"{MEM}/memory{bid}/{attr}").store(data)
    except OSError as e:
        return e.errno
    return None


def snapshot(m: Machine) -> tuple:
    zones = tuple((z.start_pfn, z.spanned, z.present, z.managed, z.used) for n in m.nodes.values() for z in n.zones)
    blocks = tuple((b.id, b.state, b.dev_offline, b.zone.name if b.zone else None, b.unmovable, b.movable)
                   for b in m.blocks.values())
    allocs = tuple((a.id, tuple(sorted(a.pieces.items()))) for a in m.allocator.allocs.values())
    return zones, blocks, allocs, m.events.seqnum, m.meminfo()


def used_by_allocs(m: Machine, zone) -> int:
    """zone.used recomputed from the allocations' pieces (+ poisoned pages)."""
    total = 0
    for a in m.allocator.allocs.values():
        for bid, n in a.pieces.items():
            b = m.blocks[bid]
            if b.zone is zone:
                total += n
        for (bid, zidx), n in a.zone_pieces.items():
            if m.nodes[m.blocks[bid].nid].zones[zidx] is zone:
                total += n
    for b in m.blocks.values():
        if b.zone is zone:
            total += b.hwpoison
        elif b.zone is None and zone.idx in b.zone_used:
            pass  # counted through zone_pieces (poison of spanning blocks is below)
    return total


def test_unmovable_pins_the_block():
    m = machine()
    assert store(m, 32, "state", b"online_kernel") is None
    a = m.alloc("unmovable", 4 * MiB, block_id=32)
    assert a.pieces == {32: 1024}
    before = snapshot(m)
    for attr, word in (("state", b"offline"), ("online", b"0")):
        assert store(m, 32, attr, word) == errno.EBUSY
        assert snapshot(m) == before  # state back to online, no uevent, counters unchanged
        assert m.blocks[32].state == "online"
    m.free(a.id)
    assert store(m, 32, "state", b"offline") is None


def test_movable_pages_migrate_when_there_is_room():
    m = machine()
    store(m, 32, "state", b"online_movable")
    store(m, 33, "state", b"online_movable")
    a = m.alloc("movable", 100 * MiB, block_id=32)
    mov = m.nodes[0].zone("Movable")
    assert (m.blocks[32].movable, mov.used) == (25600, 25600)
    free_before = m.meminfo()["MemFree"]
    assert store(m, 32, "state", b"offline") is None
    assert a.pieces == {33: 25600}  # moved to the other Movable block
    assert (m.blocks[32].movable, m.blocks[33].movable) == (0, 25600)
    assert (mov.present, mov.managed, mov.used) == (PPB, PPB, 25600)
    # the offlined block's free pages left; the drained per-cpu lists (112 pages) came back
    assert free_before - m.meminfo()["MemFree"] == (PPB - 112) * 4
    assert used_by_allocs(m, mov) == mov.used


def test_movable_pages_spill_into_kernel_zones_when_movable_is_full():
    m = machine()
    store(m, 32, "state", b"online_movable")
    store(m, 33, "state", b"online_kernel")
    a = m.alloc("movable", 128 * MiB, block_id=32)  # the whole block
    assert store(m, 32, "state", b"offline") is None
    assert a.pieces == {33: PPB}  # Movable had no other block: Normal is next in the zonelist
    assert m.nodes[0].zone("Normal").used == PPB


def test_movable_pages_migrate_across_several_targets():
    m = machine()
    for b in (32, 33, 34):
        store(m, b, "state", b"online_movable")
    m.alloc("movable", 100 * MiB, block_id=33)
    a = m.alloc("movable", 64 * MiB, block_id=32)
    assert store(m, 32, "state", b"offline") is None
    assert a.pieces == {33: PPB - 25600, 34: 16384 - (PPB - 25600)}


def test_ebusy_when_there_is_no_room_to_migrate():
    m = machine()
    store(m, 32, "state", b"online_movable")
    m.alloc("movable", 4 * MiB, block_id=32)
    free = sum(z.free for z in m.nodes[0].zones)  # the per-cpu lists' pages too
    filler = m.alloc("movable", free * 4096)  # everything else: kernel zones too
    assert m.meminfo()["MemFree"] == 0
    before = snapshot(m)
    assert store(m, 32, "state", b"offline") == errno.EBUSY
    assert snapshot(m) == before
    m.free(filler.id)
    assert store(m, 32, "state", b"offline") is None


def test_unmovable_into_movable_block_refused():
    m = machine()
    store(m, 32, "state", b"online_movable")
    before = snapshot(m)
    with pytest.raises(OSError) as ei:
        m.alloc("unmovable", 4096, block_id=32)
    assert ei.value.errno == errno.EINVAL
    assert snapshot(m) == before
    # unplaced unmovable allocations never land in ZONE_MOVABLE either
    m.alloc("unmovable", 64 * MiB)
    assert m.nodes[0].zone("Movable").used == 0


def test_allocation_refusals_change_nothing():
    m = machine()
    store(m, 32, "state", b"online_kernel")
    before = snapshot(m)
    for kind, size, bid, err in [("pinned", 4096, None, errno.EINVAL), ("movable", 0, None, errno.EINVAL),
                                 ("movable", 4096, 33, errno.EINVAL),  # offline block
                                 ("movable", 129 * MiB, 32, errno.ENOMEM),
                                 ("unmovable", 1 << 40, None, errno.ENOMEM),
                                 ("movable", 4096, 999, errno.ENODEV)]:
        with pytest.raises(OSError) as ei:
            m.alloc(kind, size, block_id=bid)
        assert ei.value.errno == err, (kind, size, bid)
        assert snapshot(m) == before
    with pytest.raises(OSError) as ei:
        m.free(12345)
    assert ei.value.errno == errno.ENOENT


def test_unplaced_allocations_prefer_the_highest_zone_then_lowest_block():
    m = machine()
    store(m, 33, "state", b"online_kernel")
    store(m, 32, "state", b"online_kernel")
    store(m, 34, "state", b"online_movable")
    u = m.alloc("unmovable", 4096)
    mv = m.alloc("movable", 4096)
    assert u.pieces == {32: 1}  # Normal before DMA32, lowest block first
    assert mv.pieces == {34: 1}  # Movable first for movable pages


def test_allocations_reach_memory0_like_the_buddy_allocator():
    """memory0 (DMA + DMA32 parts) can never be offlined, but its free pages count in MemFree
    and can be allocated: filling all of MemFree must succeed."""
    m = machine()
    free = m.meminfo()["MemFree"] // 4
    a = m.alloc("unmovable", free * 4096)
    assert m.meminfo()["MemFree"] == 0
    assert 0 in a.pieces
    for z in m.nodes[0].zones:
        assert 0 <= z.used <= z.managed
    m.free(a.id)
    assert m.meminfo()["MemFree"] == free * 4


@pytest.mark.parametrize("kernel", ["5.15", "6.1", "6.19"])
def test_placement_is_deterministic(kernel):
    def run() -> tuple:
        m = machine(kernel)
        for b, w in ((32, b"online_movable"), (33, b"online_kernel"), (34, b"online")):
            store(m, b, "state", w)
        ids = [m.alloc("movable", 7 * MiB).id, m.alloc("unmovable", 3 * MiB).id,
               m.alloc("movable", 200 * MiB).id, m.alloc("unmovable", 1 * MiB, block_id=33).id]
        m.free(ids[1])
        store(m, 32, "state", b"offline")
        return snapshot(m), tuple(tuple(sorted(a.pieces.items())) for a in m.allocator.allocs.values())

    assert run() == run()
