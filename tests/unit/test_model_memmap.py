"""memmap_on_memory accounting, profile by profile.

mm/memory_hotplug.c mhp_supports_memmap_on_memory(), memory_block_memmap_on_memory_pages(),
add_memory_resource(); drivers/base/memory.c memory_block_online()/_offline() (the V pages
are attached to the block's zone and counted present, never managed); mm/sparse.c
nr_memmap_pages (6.11+).
"""
from __future__ import annotations

import errno
import tomllib

import pytest

from memfs.machine.config import from_dict, load_config
from memfs.machine.hotplug import Machine
from memfs.sysfs.tree import build_tree

from tests.support.sysroot import memoryless_node1_machine

MEM = "/sys/devices/system/memory"
MiB, GiB = 1 << 20, 1 << 30
PPB = 32768


def machine(kernel: str = "6.1", memmap=True, dimms=(), **overrides) -> Machine:
    ov = {"boot.memmap_on_memory": memmap, "dimm": list(dimms), "hotplug.slots": 16}
    ov.update(overrides)
    return Machine(load_config(None, overrides=ov, kernel=kernel))


def online(m: Machine, bid: int, word: str = "online") -> None:
    tree = build_tree(m)
    tree.resolve(f"{MEM}/memory{bid}/state").store(word.encode() + b"\n")


def zone(m: Machine, name: str, nid: int = 0):
    return m.nodes[nid].zone(name)


def vmstat(m: Machine) -> dict[str, int]:
    text = build_tree(m).resolve("/proc/vmstat").show()
    return {k: int(v) for k, v in (line.split() for line in text.splitlines())}


def memtotal(m: Machine) -> int:
    return m.meminfo()["MemTotal"]


def memfree(m: Machine) -> int:
    return m.meminfo()["MemFree"]


# ---------------------------------------------------------------- the 128 MiB block on x86_64
@pytest.mark.parametrize("kernel", ["5.13", "5.15", "6.1", "6.6", "6.8", "6.12", "6.19"])
def test_128m_dimm_gets_512_vmemmap_pages(kernel):
    m = machine(kernel)
    assert m.memory_block_memmap_size() == 2 * MiB
    dev = m.plug(128 * MiB, dev_id="d")
    mem = m.blocks[dev.block_ids[0]]
    assert mem.nr_vmemmap_pages == 512
    assert dev.memmap_on_memory


@pytest.mark.parametrize("word, zname", [("online", "Normal"), ("online_kernel", "Normal"),
                                         ("online_movable", "Movable")])
def test_online_accounts_present_b_managed_b_minus_v_in_the_blocks_zone(word, zname):
    m = machine()
    dev = m.plug(128 * MiB, dev_id="d")
    bid = dev.block_ids[0]
    total, free, node_present = memtotal(m), memfree(m), m.nodes[0].present
    online(m, bid, word)
    z = zone(m, zname)
    assert (z.present, z.managed, z.vmemmap) == (32768, 32256, 512)
    # MemFree: the block's managed pages, less what the newly populated zone's per-cpu
    # lists took (traces: +128,576 kB on 6.1 and 6.12 for this step)
    assert memtotal(m) - total == 129024 and memfree(m) - free == 129024 - 448
    assert m.nodes[0].present - node_present == 32768
    online(m, bid, "offline")  # the offline drains the lists
    assert (z.present, z.managed, z.vmemmap) == (0, 0, 0)
    assert memtotal(m) == total and memfree(m) == free


def test_without_memmap_on_memory_online_adds_the_whole_block():
    m = machine(memmap=False)
    dev = m.plug(128 * MiB, dev_id="d")
    assert m.blocks[dev.block_ids[0]].nr_vmemmap_pages == 0
    total = memtotal(m)
    online(m, dev.block_ids[0])
    assert (zone(m, "Normal").present, zone(m, "Normal").managed) == (32768, 32768)
    assert memtotal(m) - total == 131072


# ---------------------------------------------------------------- multi-block DIMMs
@pytest.mark.parametrize("kernel", ["5.13", "5.15", "6.1"])
def test_1g_dimm_before_6_6_gets_no_altmap_and_memmap_comes_from_ram(kernel):
    """5.13-6.5: only single-block adds can host their memmap; ACPI does not ask for a
    1 GiB range, so its 4096 memmap pages (16 MiB) come from RAM at add."""
    m = machine(kernel)
    total, free = memtotal(m), memfree(m)
    dev = m.plug(GiB, dev_id="big")
    assert not dev.memmap_on_memory
    assert all(m.blocks[b].nr_vmemmap_pages == 0 for b in dev.block_ids)
    assert memtotal(m) == total
    assert free - memfree(m) == 4096 * 4
    for b in dev.block_ids:
        online(m, b)
    assert memtotal(m) - total == 1048576
    for b in dev.block_ids:
        online(m, b, "offline")
    m.unplug("big")
    # the freed memmap pages (order 9) stay on the per-cpu lists, outside MemFree ...
    assert (memtotal(m), free - memfree(m)) == (total, 4096 * 4)
    # ... where the next add finds them
    m.plug(GiB, dev_id="again")
    assert free - memfree(m) == 4096 * 4


def test_default_machine_dimm3_memmap_from_ram():
    with_dimm3 = Machine(load_config(None))
    without = Machine(load_config(None, overrides={"dimm": [{"id": "dimm1", "size": "128M"},
                                                            {"id": "dimm2", "size": "128M"}]}))
    assert memtotal(with_dimm3) == memtotal(without) == 915420
    assert memfree(without) - memfree(with_dimm3) == 16384


@pytest.mark.parametrize("force", [True, False])
def test_6_6_multi_block_dimm_falls_back_silently(force):
    m = machine("6.6", memmap="force" if force else True)
    free = memfree(m)
    dev = m.plug(GiB, dev_id="big")  # no EINVAL: silent fallback
    assert not dev.memmap_on_memory
    assert all(m.blocks[b].nr_vmemmap_pages == 0 for b in dev.block_ids)
    assert free - memfree(m) == 16384
    single = m.plug(128 * MiB, dev_id="one")
    assert m.blocks[single.block_ids[0]].nr_vmemmap_pages == 512


def test_6_6_force_changes_nothing_on_x86():
    on, force = machine("6.6"), machine("6.6", memmap="force")
    assert on.memory_block_memmap_on_memory_pages() == force.memory_block_memmap_on_memory_pages() == 512
    a, b = on.plug(128 * MiB, dev_id="d"), force.plug(128 * MiB, dev_id="d")
    assert on.blocks[a.block_ids[0]].nr_vmemmap_pages == force.blocks[b.block_ids[0]].nr_vmemmap_pages == 512
    assert build_tree(force).resolve("/sys/module/memory_hotplug/parameters/memmap_on_memory").show() == "force\n"
    assert build_tree(on).resolve("/sys/module/memory_hotplug/parameters/memmap_on_memory").show() == "Y\n"


@pytest.mark.parametrize("kernel", ["6.8", "6.12", "6.19"])
def test_6_8_splits_a_multi_block_dimm_per_block(kernel):
    m = machine(kernel)
    total, free = memtotal(m), memfree(m)
    dev = m.plug(GiB, dev_id="big")
    assert dev.memmap_on_memory
    assert [m.blocks[b].nr_vmemmap_pages for b in dev.block_ids] == [512] * 8
    assert memfree(m) == free  # no memmap taken from RAM
    for b in dev.block_ids:
        online(m, b)
    assert memtotal(m) - total == 8 * 129024 == 1032192
    assert zone(m, "Normal").present == 262144
    for b in dev.block_ids:
        online(m, b, "offline")
    m.unplug("big")
    assert (memtotal(m), memfree(m)) == (total, free)


# ---------------------------------------------------------------- who never gets it
@pytest.mark.parametrize("kernel", ["5.13", "6.1", "6.19"])
def test_probe_never_uses_memmap_on_memory(kernel):
    m = machine(kernel, probe=True)
    free = memfree(m)
    build_tree(m).resolve(f"{MEM}/probe").store(b"0x100000000\n")
    assert m.blocks[32].nr_vmemmap_pages == 0
    # one 2 MiB memmap page, and the second of the per-cpu list's batch (Machine._populate_memmap)
    assert free - memfree(m) == 2 * 512 * 4


def test_virtio_mem_never_uses_memmap_on_memory():
    m = machine("6.19")
    dev = m.plug(256 * MiB, driver="virtio_mem", dev_id="vm0")
    assert all(m.blocks[b].nr_vmemmap_pages == 0 for b in dev.block_ids)


def test_5_12_has_no_memmap_on_memory():
    m = machine("5.12")
    dev = m.plug(128 * MiB, dev_id="d")
    assert m.blocks[dev.block_ids[0]].nr_vmemmap_pages == 0
    with pytest.raises(OSError) as ei:
        build_tree(m).resolve("/sys/module/memory_hotplug")
    assert ei.value.errno == errno.ENOENT


def test_param_off_means_no_altmap():
    m = machine("6.19", memmap=False)
    dev = m.plug(GiB, dev_id="big")
    assert not dev.memmap_on_memory and all(m.blocks[b].nr_vmemmap_pages == 0 for b in dev.block_ids)
    assert build_tree(m).resolve("/sys/module/memory_hotplug/parameters/memmap_on_memory").show() == "N\n"


def arm_machine(arch: str, kernel: str, memmap, dimm_size: str) -> Machine:
    raw = tomllib.loads(f"""
kernel = "{kernel}"
arch = "{arch}"
acpi_memory_hotplug = true     # a kernel built with it (Debian's arm64 kernels are not)
[hotplug]
base = "4G"
size = "16G"
slots = 8
[boot]
memmap_on_memory = {'"force"' if memmap == "force" else str(memmap).lower()}
[[node]]
id = 0
ram = ["0x40000000-0x80000000"]
""")
    m = Machine(from_dict(raw))
    m.plug(int(dimm_size[:-1]) * MiB, dev_id="d")
    return m


@pytest.mark.parametrize("arch, size, memmap_pages", [("arm64-16k", "128M", 32), ("arm64-64k", "512M", 8)])
@pytest.mark.parametrize("kernel, memmap", [("6.1", True), ("6.6", True), ("6.6", "force"), ("6.19", True),
                                            ("6.19", "force")])
def test_arm64_large_pages_fence_it_off(arch, size, memmap_pages, kernel, memmap):
    """16K: 32 memmap pages = 512 KiB, not a 32 MiB PMD. 64K: 8 pages = 512 KiB, not a
    512 MiB PMD; force pads to a pageblock (8192 pages) = the whole block -> rejected."""
    m = arm_machine(arch, kernel, memmap, size)
    assert -(-m.memory_block_memmap_size() // m.page_size) == memmap_pages
    assert not m.mhp_supports_memmap_on_memory(m.block_size)
    dev = m.devices["d"]
    assert not dev.memmap_on_memory and m.blocks[dev.block_ids[0]].nr_vmemmap_pages == 0
    if memmap == "force" and arch == "arm64-64k":
        assert m.memory_block_memmap_on_memory_pages() == m.pages_per_block


def test_arm64_4k_supports_it_like_x86():
    m = arm_machine("arm64-4k", "6.1", True, "128M")
    assert m.blocks[m.devices["d"].block_ids[0]].nr_vmemmap_pages == 512


@pytest.mark.parametrize("kernel, memmap", [("6.1", True), ("6.6", "force"), ("6.19", True)])
def test_struct_page_56_bytes_fences_it_off(kernel, memmap):
    """32768 * 56 = 1792 KiB of memmap: not PMD-aligned (force pads the pages to 512 but the
    arch check still looks at the vmemmap size)."""
    m = machine(kernel, memmap=memmap, struct_page_size=56)
    dev = m.plug(128 * MiB, dev_id="d")
    assert m.blocks[dev.block_ids[0]].nr_vmemmap_pages == 0
    if memmap == "force":
        assert m.memory_block_memmap_on_memory_pages() == 512


# ---------------------------------------------------------------- /proc/vmstat nr_memmap (6.11+)
@pytest.mark.parametrize("memmap", [True, False])
def test_nr_memmap_pages_on_6_12(memmap):
    m = machine("6.12", memmap=memmap)
    st = vmstat(m)
    assert st["nr_memmap_boot_pages"] == 8 * 512  # eight present boot sections
    assert st["nr_memmap_pages"] == 0
    m.plug(GiB, dev_id="big")
    assert vmstat(m)["nr_memmap_pages"] == 8 * 512
    m.plug(128 * MiB, dev_id="small")
    assert vmstat(m)["nr_memmap_pages"] == 9 * 512
    big = m.devices["big"]
    online(m, big.block_ids[0])
    assert vmstat(m)["nr_memmap_pages"] == 9 * 512  # online/offline do not move it
    online(m, big.block_ids[0], "offline")
    m.unplug("big")
    assert vmstat(m)["nr_memmap_pages"] == 512
    assert vmstat(m)["nr_memmap_boot_pages"] == 8 * 512


@pytest.mark.parametrize("kernel", ["5.13", "6.1", "6.6", "6.8"])
def test_no_nr_memmap_lines_before_6_11(kernel):
    m = machine(kernel)
    m.plug(128 * MiB, dev_id="d")
    text = build_tree(m).resolve("/proc/vmstat").show()
    assert "nr_memmap" not in text


# ---------------------------------------------------------------- ENOMEM for the memmap
def fill_ram(m: Machine, leave: int) -> None:
    free_pages = memfree(m) // 4
    m.alloc("unmovable", (free_pages - leave) * 4096)
    assert memfree(m) // 4 == leave


def full_snapshot(m: Machine) -> tuple:
    zones = tuple((z.start_pfn, z.spanned, z.present, z.managed, z.used) for n in m.nodes.values() for z in n.zones)
    return (zones, tuple(sorted(m.blocks)), tuple(sorted(m.devices)), tuple(m.slots), m.events.seqnum,
            len(m.ost_log), len(m.groups), m.nr_memmap_pages, len(m.allocator.allocs), memfree(m))


def test_add_without_memmap_on_memory_fails_enomem_when_ram_is_full():
    m = machine(memmap=False)
    fill_ram(m, 511)
    before = full_snapshot(m)
    with pytest.raises(OSError) as ei:
        m.plug(128 * MiB, dev_id="d")
    assert ei.value.errno == errno.ENOMEM
    assert full_snapshot(m) == before
    # exactly enough is enough
    m.free(max(m.allocator.allocs))
    fill_ram(m, 512)
    m.plug(128 * MiB, dev_id="d")
    assert memfree(m) == 0


def test_add_with_memmap_on_memory_needs_no_ram_for_the_memmap():
    m = machine()
    fill_ram(m, 0)
    dev = m.plug(128 * MiB, dev_id="d")  # self-hosted: fine
    assert m.blocks[dev.block_ids[0]].nr_vmemmap_pages == 512
    before = full_snapshot(m)
    with pytest.raises(OSError) as ei:
        m.plug(GiB, dev_id="big")  # 6.1: multi-block falls back to RAM -> ENOMEM
    assert ei.value.errno == errno.ENOMEM
    assert full_snapshot(m) == before


def test_memmap_from_ram_prefers_the_new_nodes_memory_then_others():
    m = memoryless_node1_machine(memmap_on_memory=False)
    free0 = m.meminfo(0)["MemFree"]
    m.plug(128 * MiB, node=1, dev_id="d")  # node 1 has no memory: falls back to node 0
    assert free0 - m.meminfo(0)["MemFree"] == 2 * 2048  # the memmap + the per-cpu batch's second page
    assert m.nodes[1].online


def test_memmap_pages_from_ram_go_through_the_per_cpu_lists():
    """Trace b of every kernel: the first runtime add without memmap_on_memory costs two
    2 MiB pages (a batch of two order-9 pages, one kept on the Normal zone's per-cpu list),
    the removal gives nothing back (the page goes onto the list), the re-add costs nothing
    (it takes it from there), and the next offline in that zone drains the list."""
    m = machine("6.12", memmap=False, dimms=[{"id": "dimm1", "size": "128M"}, {"id": "dimm2", "size": "128M"}])
    online(m, 32, "online_kernel")  # cold-plugged dimm1: Normal is populated (and its lists filled)
    online(m, 33, "online_kernel")
    free = memfree(m)
    m.plug(128 * MiB, dev_id="d4")
    assert free - memfree(m) == 2 * 2048
    assert [a.label for a in m.allocator.allocs.values() if a.label in ("memmap:d4", "pcp")] == ["memmap:d4", "pcp"]
    m.unplug("d4")
    assert free - memfree(m) == 2 * 2048
    m.plug(128 * MiB, dev_id="d5")
    assert free - memfree(m) == 2 * 2048
    m.unplug("d5")
    before = memfree(m)
    online(m, 33, "offline")  # a Normal block: its zone's lists are drained
    assert memfree(m) - before == -131072 + 2 * 2048 + 448  # two memmap pages, the 112 of the fill


def test_offline_drains_a_per_cpu_batch_that_straddles_two_zones():
    """A per-cpu batch the allocator placed across a DMA32 boot block and an online Normal
    block counts as DMA32's, but its pages in the Normal block are on Normal's lists: the
    offline of that block drains them too, and no page is left in an offline block
    (found by the leak test: an allocation in an offline block broke the accounting)."""
    from memfs.machine import alloc as _alloc
    from memfs.machine.hotplug import MMOP_ONLINE_KERNEL
    from memfs.status import snapshot
    from tests.support.reliability import invariants
    from tests.support.sysroot import machine
    m = machine("6.1")
    m.state_store(36, MMOP_ONLINE_KERNEL)
    with m.lock:
        fill = m.allocator.allocate(_alloc.UNMOVABLE, m.block(1).free - 199, 0, label="kernel",
                                    order=[m.block(1)])
        batch = m.allocator.allocate(_alloc.UNMOVABLE, 512, 0, label=_alloc.PCP,
                                     order=[m.block(1), m.block(36)])
        m.pcp_lists.append(batch.id)
    assert batch.pieces == {1: 199, 36: 313}
    m.state_store(36, 0)  # only per-cpu pages in the block: the offline goes through
    assert m.block(36).state == "offline" and batch.id not in m.allocator.allocs
    assert batch.id not in m.pcp_lists and fill.id in m.allocator.allocs
    assert invariants(snapshot(m)) == []
