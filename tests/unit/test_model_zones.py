"""Zone selection, valid_zones and zone span accounting.

mm/memory_hotplug.c: zone_for_pfn_range(), default_kernel_zone_for_pfn(),
default_zone_for_pfn() (contig-zones), auto_movable_zone_for_pfn() /
auto_movable_can_online_movable() (auto-movable), resize_zone_range(), shrink_zone_span().
"""
from __future__ import annotations

import tomllib

import pytest

from memfs.machine.config import from_dict
from memfs.machine.hotplug import Machine

from tests.support.sysroot import Sysroot, machine

MEM = "/sys/devices/system/memory"
PARAMS = "/sys/module/memory_hotplug/parameters"
MiB, GiB = 1 << 20, 1 << 30
PPB = 32768  # pages per 128 MiB block




class Sys(Sysroot):

    def set_state(self, bid: int, word: str) -> None:
        err = self.write(f"{MEM}/memory{bid}/state", word.encode() + b"\n")
        assert err is None, (bid, word, err)

    def vz(self, bid: int) -> str:
        return self.read(f"{MEM}/memory{bid}/valid_zones").rstrip("\n")


def zone(m: Machine, name: str, nid: int = 0):
    return m.nodes[nid].zone(name)


def span(m: Machine, name: str, nid: int = 0) -> tuple[int, int]:
    z = zone(m, name, nid)
    return z.start_pfn, z.spanned


# ---------------------------------------------------------------- contig-zones
def test_offline_hotplugged_block_beyond_all_zones_defaults_normal():
    s = Sys(machine())
    assert s.vz(32) == "Normal Movable"
    s.set_state(32, "online")
    assert s.vz(32) == "Normal"


def test_block_inside_movable_span_defaults_movable():
    s = Sys(machine())
    s.set_state(32, "online_movable")
    s.set_state(34, "online_movable")
    assert span(s.m, "Movable") == (32 * PPB, 3 * PPB)
    assert s.vz(33) == "Movable Normal"  # the hole between two movable blocks
    s.set_state(33, "online")
    assert s.vz(33) == "Movable"
    # adjacency alone does not make the next block Movable: memory35 is outside the span
    assert s.vz(35) == "Normal Movable"


def test_block_inside_normal_span_defaults_normal_even_with_movable_node():
    s = Sys(machine(**{"boot.movable_node": True}))
    assert s.vz(33) == "Movable Normal"  # neither zone spans it: movable_node picks Movable
    s.set_state(32, "online_kernel")
    s.set_state(34, "online_kernel")
    assert s.vz(33) == "Normal Movable"  # inside Normal's span only: inherit Normal


def test_movable_node_defaults_movable():
    s = Sys(machine(**{"boot.movable_node": True}))
    assert s.vz(32) == "Movable Normal"
    s.write(f"{MEM}/memory32/online", b"1")
    assert s.vz(32) == "Movable"


def test_both_spans_intersect_falls_back_to_kernel_zone():
    """Boot DMA32 blocks memory2..4 offlined, memory2 and memory4 onlined movable: memory3
    lies inside both DMA32's and Movable's span -> neither/both -> the kernel zone."""
    s = Sys(machine())
    for b in (2, 3, 4):
        s.set_state(b, "offline")
    assert span(s.m, "DMA32") == (4096, 258016)  # holes in the middle keep the span
    s.set_state(2, "online_movable")
    s.set_state(4, "online_movable")
    assert span(s.m, "Movable") == (2 * PPB, 3 * PPB)
    assert s.vz(3) == "DMA32 Movable"
    s.set_state(3, "online")
    assert s.vz(3) == "DMA32"


def test_online_kernel_picks_dma32_when_its_span_intersects():
    s = Sys(machine())
    s.set_state(3, "offline")
    assert s.vz(3) == "DMA32 Movable"
    s.set_state(3, "online_kernel")
    assert s.vz(3) == "DMA32"
    # a hot-added block below 4 GiB but outside DMA32's span goes Normal, not DMA32
    dev = s.m.plug(128 * MiB, addr=GiB, dev_id="low")
    assert s.vz(dev.block_ids[0]) == "Normal Movable"


def test_online_movable_always_movable():
    s = Sys(machine())
    s.set_state(3, "offline")
    s.set_state(3, "online_movable")
    assert s.vz(3) == "Movable"
    assert zone(s.m, "DMA32").present == 258016 - PPB
    # inside Normal's span, online_movable still goes Movable
    s.set_state(32, "online_kernel")
    s.set_state(34, "online_kernel")
    s.set_state(33, "online_movable")
    assert s.vz(33) == "Movable"


def test_valid_zones_online_and_none():
    s = Sys(machine())
    assert s.vz(0) == "none"
    assert [s.vz(b) for b in range(1, 8)] == ["DMA32"] * 7
    s.set_state(34, "online_movable")
    s.set_state(35, "online_kernel")
    assert (s.vz(34), s.vz(35)) == ("Movable", "Normal")
    assert s.read(f"{MEM}/memory34/valid_zones") == "Movable\n"


# ---------------------------------------------------------------- auto-movable
def auto_movable(s: Sys, ratio: int | None = None, numa_aware: bool | None = None) -> None:
    assert s.write(f"{PARAMS}/online_policy", b"auto-movable\n") is None
    if ratio is not None:
        assert s.write(f"{PARAMS}/auto_movable_ratio", f"{ratio}\n".encode()) is None
    if numa_aware is not None:
        assert s.write(f"{PARAMS}/auto_movable_numa_aware", b"Y\n" if numa_aware else b"N\n") is None


def test_auto_movable_ratio_zero_is_kernel_zone():
    s = Sys(machine())
    auto_movable(s, ratio=0)
    assert s.vz(32) == "Normal Movable"
    s.set_state(32, "online")
    assert s.vz(32) == "Normal"


def test_auto_movable_default_prefers_movable():
    s = Sys(machine())
    auto_movable(s)
    assert s.vz(32) == "Movable Normal"
    s.write(f"{MEM}/memory32/online", b"1")
    assert s.vz(32) == "Movable"


def test_auto_movable_ignores_movable_node():
    s = Sys(machine(**{"boot.movable_node": True}))
    auto_movable(s, ratio=0)
    assert s.vz(32) == "Normal Movable"  # contig-zones would have said "Movable Normal"


def test_auto_movable_static_group_with_kernel_pages_stays_kernel():
    s = Sys(machine())
    auto_movable(s)
    assert s.vz(35) == "Movable Normal"
    s.set_state(34, "online_kernel")  # one block of the 1 GiB DIMM in Normal
    assert s.vz(35) == "Normal Movable"  # "if anything is !MOVABLE online the rest !MOVABLE"
    s.set_state(35, "online")
    assert s.vz(35) == "Normal"
    assert s.vz(32) == "Movable Normal"  # other DIMMs are other groups


def boot_kernel_early_pages(m: Machine) -> int:
    return sum(z.present_early - z.cma for n in m.nodes.values() for z in n.zones if not z.is_movable)


def test_auto_movable_301_percent_of_boot_kernel_memory_with_probe_blocks():
    """Default 1 GiB VM: kernel_early = DMA 3998 + DMA32 258016 = 262014 pages; the limit is
    301 * 262014 // 100 = 788662 movable pages. Ungrouped (probe) blocks are their own unit
    (32768 pages): 24 * 32768 = 786432 fits, 25 * 32768 = 819200 does not -> the 25th
    block goes Normal."""
    m = machine(probe=True, dimm=[])
    s = Sys(m)
    auto_movable(s)
    assert boot_kernel_early_pages(m) == 3998 + 258016 == 262014
    limit = 301 * 262014 // 100
    assert limit == 788662
    n_movable = limit // PPB
    assert n_movable == 24
    for i in range(n_movable + 2):
        addr = 4 * GiB + i * 128 * MiB
        assert s.write(f"{MEM}/probe", f"{addr:#x}\n".encode()) is None
        bid = addr // (128 * MiB)
        expect = "Movable" if i < n_movable else "Normal"
        assert s.vz(bid).split()[0] == expect, i
        assert s.write(f"{MEM}/memory{bid}/online", b"1") is None
        assert s.vz(bid) == expect
    assert zone(m, "Movable").present == 24 * PPB
    # hot-added kernel memory never raises the allowance
    assert zone(m, "Normal").present == 2 * PPB
    nxt = (4 * GiB + (n_movable + 2) * 128 * MiB)
    s.write(f"{MEM}/probe", f"{nxt:#x}".encode())
    assert s.vz(nxt // (128 * MiB)) == "Normal Movable"


def test_auto_movable_ratio_counts_the_whole_static_group():
    """ACPI DIMMs are static groups: the remaining pages of the whole DIMM are tested.
    A 3 GiB DIMM (786432 pages) fits under 788662; a 3 GiB + 128 MiB DIMM does not, so even
    its first block goes Normal (and then the rest follows the group's kernel pages)."""
    m = machine(dimm=[])
    s = Sys(m)
    auto_movable(s)
    big = m.plug(3 * GiB + 128 * MiB, dev_id="big")
    assert all(s.vz(b) == "Normal Movable" for b in big.block_ids)
    m.unplug("big")
    ok = m.plug(3 * GiB, dev_id="ok")
    for b in ok.block_ids:
        assert s.vz(b) == "Movable Normal"
        s.set_state(b, "online")
    assert zone(m, "Movable").present == 3 * GiB // 4096
    small = m.plug(128 * MiB, dev_id="small")
    assert s.vz(small.block_ids[0]) == "Normal Movable"  # 786432 + 32768 > 788662


def test_auto_movable_memmap_on_memory_vmemmap_pages_count_as_movable_present():
    """The V vmemmap pages are present in the block's zone, so they count in the ratio."""
    m = machine(dimm=[], **{"hotplug.slots": 32})
    s = Sys(m)
    auto_movable(s)
    devs = [m.plug(128 * MiB, dev_id=f"d{i}") for i in range(25)]
    # with memmap_on_memory every 128 MiB DIMM is 32768 present pages (512 of them vmemmap)
    for i, d in enumerate(devs[:24]):
        b = d.block_ids[0]
        assert m.blocks[b].nr_vmemmap_pages == 512
        assert s.vz(b).startswith("Movable"), i
        s.set_state(b, "online")
    assert zone(m, "Movable").present == 24 * PPB
    assert s.vz(devs[24].block_ids[0]).startswith("Normal")


TWO_NODES = """
kernel = "6.1"
probe = true
[hotplug]
base = "4G"
size = "23G"
slots = 8
[[node]]
id = 0
ram = ["0x100000-0x40000000"]
[[node]]
id = 1
ram = ["0x40000000-0x50000000"]
"""


def two_node_machine() -> Machine:
    return Machine(from_dict(tomllib.loads(TWO_NODES)))


@pytest.mark.parametrize("numa_aware", [True, False])
def test_auto_movable_numa_aware_per_node_check(numa_aware):
    """node1 has 256 MiB of boot kernel memory (65536 pages): 301% allows 197263 movable
    pages on node1, i.e. 6 blocks; globally (327424 kernel pages -> 985546) 30 blocks."""
    m = two_node_machine()
    s = Sys(m)
    auto_movable(s, numa_aware=numa_aware)
    node1_early = sum(z.present_early for z in m.nodes[1].zones if not z.is_movable)
    assert node1_early == 65536 and 301 * node1_early // 100 == 197263
    assert boot_kernel_early_pages(m) == 261888 + 65536
    zones = []
    for i in range(8):
        dev = m.plug(128 * MiB, node=1, driver="probe", addr=8 * GiB + i * 128 * MiB)
        b = dev.block_ids[0]
        zones.append(s.vz(b).split()[0])
        s.write(f"{MEM}/memory{b}/online", b"1")
    if numa_aware:
        assert zones == ["Movable"] * 6 + ["Normal"] * 2
    else:
        assert zones == ["Movable"] * 8
    # node 0 has its own allowance: still Movable there
    dev = m.plug(128 * MiB, node=0, driver="probe", addr=16 * GiB)
    assert s.vz(dev.block_ids[0]).startswith("Movable")


def test_auto_movable_policy_not_on_5_13():
    m = machine("5.13")
    s = Sys(m)
    assert s.write(f"{PARAMS}/online_policy", b"auto-movable") is not None  # no such parameter
    assert s.vz(32) == "Normal Movable"


# ---------------------------------------------------------------- spans
def test_zone_span_grows_and_shrinks_only_at_edges():
    m = machine(**{"boot.memmap_on_memory": False})
    s = Sys(m)
    for b in (35, 36, 37, 38):
        s.set_state(b, "online_movable")
    assert span(m, "Movable") == (35 * PPB, 4 * PPB)
    s.set_state(34, "online_movable")  # below the start: the start moves down
    assert span(m, "Movable") == (34 * PPB, 5 * PPB)
    s.set_state(36, "offline")  # middle: unchanged
    assert span(m, "Movable") == (34 * PPB, 5 * PPB)
    assert zone(m, "Movable").present == 4 * PPB
    s.set_state(34, "offline")  # low edge: to the nearest online block (35)
    assert span(m, "Movable") == (35 * PPB, 4 * PPB)
    s.set_state(35, "offline")  # low edge again: 36 is offline, so 37
    assert span(m, "Movable") == (37 * PPB, 2 * PPB)
    s.set_state(38, "offline")  # high edge
    assert span(m, "Movable") == (37 * PPB, PPB)
    s.set_state(37, "offline")  # last block
    assert span(m, "Movable") == (0, 0)
    assert zone(m, "Movable").present == 0


def test_high_edge_skips_offline_holes_to_nearest_online_block():
    m = machine(**{"boot.memmap_on_memory": False})
    s = Sys(m)
    for b in (34, 35, 36, 37):
        s.set_state(b, "online_kernel")
    s.set_state(35, "offline")
    s.set_state(36, "offline")
    s.set_state(37, "offline")
    assert span(m, "Normal") == (34 * PPB, PPB)


def test_zone_span_starts_at_block_start_with_memmap_on_memory():
    m = machine()
    s = Sys(m)
    assert m.blocks[32].nr_vmemmap_pages == 512
    s.set_state(32, "online_movable")
    assert span(m, "Movable") == (32 * PPB, PPB)
    s.set_state(32, "offline")
    assert span(m, "Movable") == (0, 0)


def test_offlining_a_boot_dma32_block_keeps_or_shrinks_the_dma32_span():
    m = machine()
    s = Sys(m)
    s.set_state(3, "offline")
    assert span(m, "DMA32") == (4096, 258016)
    assert zone(m, "DMA32").present == 258016 - PPB
    s.set_state(3, "online")
    assert zone(m, "DMA32").present == 258016
    assert zone(m, "DMA32").managed == 225015


def test_node_span_follows_zone_spans():
    m = machine(**{"boot.memmap_on_memory": False})
    s = Sys(m)
    assert m.nodes[0].span() == (1, 262112 - 1)
    s.set_state(40, "online_movable")
    assert m.nodes[0].span() == (1, 41 * PPB - 1)
    s.set_state(40, "offline")
    assert m.nodes[0].span() == (1, 262112 - 1)
