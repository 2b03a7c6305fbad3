"""Add and remove: probe, ACPI DIMMs (eject two-pass), virtio-mem, auto-online, hwpoison.

mm/memory_hotplug.c register_memory_resource() (E2BIG, EEXIST), check_hotplug_memory_range()
(EINVAL), add_memory_resource() + online_memory_block() (auto-online), try_remove_memory(),
offline_and_remove_memory(); drivers/acpi/scan.c acpi_scan_try_to_offline() /
acpi_bus_offline() / acpi_bus_online(); drivers/base/memory.c probe_store(),
memory_block_online() (EHWPOISON), soft/hard_offline_page.
"""
from __future__ import annotations

import errno

import pytest

from memfs.machine.config import load_config
from memfs.machine.hotplug import EHWPOISON, Machine
from memfs.sysfs.tree import build_tree

MEM = "/sys/devices/system/memory"
ACPI = "/sys/bus/acpi/devices"
LNX = "/sys/devices/LNXSYSTM:00/LNXSYBUS:00/PNP0A06:04"
MiB, GiB = 1 << 20, 1 << 30
PPB = 32768


def machine(kernel: str = "6.1", dimms=(), **overrides) -> Machine:
    ov = {"dimm": list(dimms), "probe": True}
    ov.update(overrides)
    return Machine(load_config(None, overrides=ov, kernel=kernel))


class Sys:
    def __init__(self, m: Machine) -> None:
        self.m = m
        self.tree = build_tree(m)

    def node(self, path: str):
        return self.tree.resolve(path)

    def read(self, path: str) -> str:
        return self.node(path).show()

    def write(self, path: str, data: bytes) -> int | None:
        try:
            self.node(path).store(data)
        except OSError as e:
            return e.errno
        return None

    def exists(self, path: str) -> bool:
        try:
            self.node(path)
        except OSError:
            return False
        return True

    def state(self, bid: int, word: str) -> int | None:
        return self.write(f"{MEM}/memory{bid}/state", word.encode() + b"\n")

    def vz(self, bid: int) -> str:
        return self.read(f"{MEM}/memory{bid}/valid_zones").rstrip("\n")


def events_since(m: Machine, seq: int) -> list[tuple[str, str]]:
    return [(e.action, e.devpath.rsplit("/", 1)[1]) for e in m.events.since(seq)]


def snapshot(m: Machine) -> tuple:
    zones = tuple((z.start_pfn, z.spanned, z.present, z.managed, z.used) for n in m.nodes.values() for z in n.zones)
    blocks = tuple((b.id, b.state, b.zone.name if b.zone else None) for b in m.blocks.values())
    return (zones, blocks, tuple(sorted(m.devices)), tuple(d and d.id for d in m.slots), m.events.seqnum,
            len(m.ost_log), m.meminfo(), m.nr_memmap_pages, tuple(sorted(m.nodes[0].blocks)))


# ---------------------------------------------------------------- add refusals
def test_probe_adds_one_offline_block_and_emits_add():
    s = Sys(machine())
    seq = s.m.events.seqnum
    assert s.write(f"{MEM}/probe", b"0x100000000\n") is None
    assert s.read(f"{MEM}/memory32/state") == "offline\n"
    assert events_since(s.m, seq) == [("add", "memory32")]
    assert s.exists("/sys/devices/system/node/node0/memory32")
    assert s.read(f"{MEM}/memory32/phys_index") == "00000020\n"
    assert not s.exists(f"{MEM}/memory32/firmware_node")  # not an ACPI block


@pytest.mark.parametrize("addr, err", [
    (b"0x100000000", errno.EEXIST),   # the block exists already (second probe)
    (b"0x0", errno.EEXIST),           # boot RAM
    (b"0x38000000", errno.EEXIST),    # boot RAM, memory7
    (b"0x104000000", errno.EINVAL),   # not block aligned
    (b"0x1000", errno.EINVAL),
    (b"junk", errno.EINVAL),          # kstrtoull
    (b"0x400000000000", errno.E2BIG),  # 2^46: beyond MAX_PHYSMEM_BITS on x86_64
    (b"0x7ffff8000000", errno.E2BIG),
    (b"0x10000000000000000", errno.ERANGE),
])
def test_probe_refusals_change_nothing(addr, err):
    s = Sys(machine())
    s.write(f"{MEM}/probe", b"0x100000000")
    before = snapshot(s.m)
    assert s.write(f"{MEM}/probe", addr) == err
    assert snapshot(s.m) == before


def test_probe_at_the_last_block_below_2_pow_46():
    s = Sys(machine())
    addr = (1 << 46) - 128 * MiB
    assert s.write(f"{MEM}/probe", f"{addr:#x}".encode()) is None
    assert s.read(f"{MEM}/memory{addr // (128 * MiB)}/state") == "offline\n"


def test_overlapping_dimm_refused_eexist():
    m = machine()
    m.plug(256 * MiB, addr=4 * GiB, dev_id="a")
    before = snapshot(m)
    for addr in (4 * GiB, 4 * GiB + 128 * MiB, 4 * GiB - 128 * MiB):
        with pytest.raises(OSError) as ei:
            m.plug(256 * MiB, addr=addr, dev_id="b")
        assert ei.value.errno == errno.EEXIST
        assert snapshot(m) == before
    with pytest.raises(OSError) as ei:
        m.plug(192 * MiB, dev_id="c")
    assert ei.value.errno == errno.EINVAL and snapshot(m) == before


def test_probe_not_present_without_config_arch_memory_probe():
    s = Sys(machine(probe=False))
    assert not s.exists(f"{MEM}/probe")


# ---------------------------------------------------------------- auto_online_blocks
@pytest.mark.parametrize("policy, zone", [("online", "Normal"), ("online_kernel", "Normal"),
                                          ("online_movable", "Movable")])
def test_auto_online_applies_to_later_adds_with_the_configured_type(policy, zone):
    s = Sys(machine())
    s.m.plug(128 * MiB, dev_id="before")
    assert s.write(f"{MEM}/auto_online_blocks", policy.encode() + b"\n") is None
    assert s.read(f"{MEM}/auto_online_blocks") == policy + "\n"
    assert s.read(f"{MEM}/memory32/state") == "offline\n"  # existing blocks are not touched
    seq = s.m.events.seqnum
    dev = s.m.plug(256 * MiB, dev_id="after")
    a, b = dev.block_ids
    # add events for the whole request first, then the onlines
    assert events_since(s.m, seq) == [("add", f"memory{a}"), ("add", f"memory{b}"),
                                      ("online", f"memory{a}"), ("online", f"memory{b}")]
    assert s.vz(a) == s.vz(b) == zone
    assert s.m.blocks[a].online_type == 0  # reset after the attempt


def test_auto_online_online_uses_the_default_zone_movable_node():
    s = Sys(machine(**{"boot.movable_node": True, "boot.memhp_default_state": "online"}))
    dev = s.m.plug(128 * MiB, dev_id="d")
    assert s.vz(dev.block_ids[0]) == "Movable"


@pytest.mark.parametrize("bad", [b"Online\n", b"on\n", b"online_normal", b"\n", b"online\n\n"])
def test_auto_online_blocks_store_refusals(bad):
    s = Sys(machine())
    assert s.write(f"{MEM}/auto_online_blocks", bad) == errno.EINVAL
    assert s.read(f"{MEM}/auto_online_blocks") == "offline\n"
    assert s.write(f"{MEM}/auto_online_blocks", b"offline") is None  # rewriting is fine


def test_auto_online_failures_are_ignored(monkeypatch):
    m = machine(**{"boot.memhp_default_state": "online"})
    calls = []

    def fail(mem):
        calls.append(mem.id)
        raise OSError(errno.ENOMEM, "notifier says no")

    monkeypatch.setattr(m, "memory_block_online", fail)
    seq = m.events.seqnum
    dev = m.plug(256 * MiB, dev_id="d")  # the add still succeeds
    assert calls == dev.block_ids
    assert [m.blocks[b].state for b in dev.block_ids] == ["offline", "offline"]
    assert [a for a, _ in events_since(m, seq)] == ["add", "add"]


def test_memhp_default_state_boot_param():
    m = machine(**{"boot.memhp_default_state": "online_movable"})
    assert build_tree(m).resolve(f"{MEM}/auto_online_blocks").show() == "online_movable\n"
    # cold-plugged DIMMs are added at boot too: auto-onlined movable
    m2 = Machine(load_config(None, overrides={"boot.memhp_default_state": "online_movable"}))
    assert all(m2.blocks[b].zone.name == "Movable" for b in range(32, 42))


# ---------------------------------------------------------------- ACPI eject
def test_successful_eject_events_in_kernel_order_slot_and_links():
    s = Sys(machine())
    dev = s.m.plug(256 * MiB, dev_id="d")
    a, b = dev.block_ids
    slot = f"{ACPI}/PNP0C80:00"
    assert s.read(f"{LNX}/PNP0C80:00/status") == "15\n"
    assert s.state(a, "online_movable") is None and s.state(b, "online") is None
    assert s.exists(f"/sys/devices/system/node/node0/memory{a}")
    seq, ost = s.m.events.seqnum, len(s.m.ost_log)
    assert s.write(f"{slot}/eject".replace(ACPI, LNX), b"1\n") is None
    assert events_since(s.m, seq) == [("offline", f"memory{a}"), ("offline", f"memory{b}"),
                                      ("remove", f"memory{a}"), ("remove", f"memory{b}")]
    assert [(o.status) for o in list(s.m.ost_log)[ost:]] == [0x84, 0]
    assert s.read(f"{LNX}/PNP0C80:00/status") == "0\n"
    assert not s.exists(f"{MEM}/memory{a}") and not s.exists(f"/sys/devices/system/node/node0/memory{a}")
    assert s.m.nodes[0].zone("Movable").present == 0 and s.m.nodes[0].zone("Normal").present == 0


def test_eject_with_a_pinned_block_fails_ebusy_and_reonlines_with_the_default_zone():
    """acpi_scan_try_to_offline(): the first pass offlines A (Movable), B fails; the second
    pass fails again; acpi_bus_online() re-onlines A through device_online() with no type,
    i.e. MMOP_ONLINE: the *default* zone (Normal: Movable's span went with A), not Movable."""
    s = Sys(machine())
    dev = s.m.plug(256 * MiB, dev_id="d")
    a, b = dev.block_ids
    s.state(a, "online_movable")
    s.state(b, "online_kernel")
    s.m.alloc("unmovable", 4096, block_id=b)
    seq, ost = s.m.events.seqnum, len(s.m.ost_log)
    with pytest.raises(OSError) as ei:
        s.m.acpi_eject("d")
    assert ei.value.errno == errno.EBUSY
    assert events_since(s.m, seq) == [("offline", f"memory{a}"), ("online", f"memory{a}")]
    assert [o.status for o in list(s.m.ost_log)[ost:]] == [0x84, 0x82]
    assert s.vz(a) == "Normal" and s.vz(b) == "Normal"
    assert s.read(f"{LNX}/PNP0C80:00/status") == "15\n"
    assert s.m.nodes[0].zone("Movable").present == 0
    # through sysfs the eject request is queued work: the writer sees success
    assert s.write(f"{LNX}/PNP0C80:00/eject", b"1") is None
    assert s.read(f"{MEM}/memory{a}/state") == "online\n"


def test_eject_reonline_uses_a_stale_online_type():
    """device_online() from acpi_bus_online() also picks up a stale mem->online_type."""
    s = Sys(machine())
    dev = s.m.plug(256 * MiB, dev_id="d")
    a, b = dev.block_ids
    s.state(a, "online_kernel")
    assert s.state(a, "online_movable") == errno.EINVAL  # leaves MMOP_ONLINE_MOVABLE behind
    s.state(b, "online_kernel")
    s.m.alloc("unmovable", 4096, block_id=b)
    with pytest.raises(OSError):
        s.m.acpi_eject("d")
    assert s.vz(a) == "Movable"


def test_eject_of_offline_blocks_has_no_offline_events():
    s = Sys(machine())
    dev = s.m.plug(256 * MiB, dev_id="d")
    a, b = dev.block_ids
    s.state(b, "online")
    seq = s.m.events.seqnum
    s.m.acpi_eject("d")
    assert events_since(s.m, seq) == [("offline", f"memory{b}"), ("remove", f"memory{a}"),
                                      ("remove", f"memory{b}")]


def test_eject_sysfs_refusals():
    s = Sys(machine())
    s.m.plug(128 * MiB, dev_id="d")
    assert s.write(f"{LNX}/PNP0C80:00/eject", b"0") == errno.EINVAL
    assert s.write(f"{LNX}/PNP0C80:01/eject", b"1") == errno.ENODEV  # empty slot


def test_remove_refuses_online_blocks():
    m = machine()
    dev = m.plug(256 * MiB, dev_id="d", driver="dax_kmem")
    Sys(m).state(dev.block_ids[1], "online")
    before = snapshot(m)
    with m.lock, pytest.raises(OSError) as ei:  # remove_memory() expects the hotplug lock held
        m.remove_memory(dev)
    assert ei.value.errno == errno.EBUSY and snapshot(m) == before


# ---------------------------------------------------------------- offline_and_remove_memory / virtio-mem
def test_offline_and_remove_reonlines_with_the_remembered_zone_type():
    """try_offline_memory_block() remembers MMOP_ONLINE_MOVABLE for a Movable block;
    try_reonline_memory_block() sets it as online_type: back to Movable (not the default)."""
    s = Sys(machine())
    dev = s.m.plug(256 * MiB, dev_id="vm0", driver="virtio_mem")
    a, b = dev.block_ids
    s.state(a, "online_movable")
    s.state(b, "online_kernel")
    s.m.alloc("unmovable", 4096, block_id=b)
    assert s.vz(a) == "Movable"
    seq = s.m.events.seqnum
    before = snapshot(s.m)
    with pytest.raises(OSError) as ei:
        s.m.unplug("vm0")
    assert ei.value.errno == errno.EBUSY
    assert events_since(s.m, seq) == [("offline", f"memory{a}"), ("online", f"memory{a}")]
    assert s.vz(a) == "Movable"
    assert snapshot(s.m)[:4] == before[:4]


def test_offline_and_remove_success():
    s = Sys(machine())
    dev = s.m.plug(256 * MiB, dev_id="vm0", driver="virtio_mem")
    a, b = dev.block_ids
    s.state(a, "online_movable")
    seq = s.m.events.seqnum
    s.m.unplug("vm0")
    assert events_since(s.m, seq) == [("offline", f"memory{a}"), ("remove", f"memory{a}"),
                                      ("remove", f"memory{b}")]
    assert "vm0" not in s.m.devices


def test_virtio_mem_adds_block_by_block():
    m = machine(**{"boot.memhp_default_state": "online"})
    seq = m.events.seqnum
    dev = m.plug(384 * MiB, dev_id="vm0", driver="virtio_mem")
    a, b, c = dev.block_ids
    assert events_since(m, seq) == [("add", f"memory{a}"), ("online", f"memory{a}"),
                                    ("add", f"memory{b}"), ("online", f"memory{b}"),
                                    ("add", f"memory{c}"), ("online", f"memory{c}")]
    assert not Sys(m).exists(f"{MEM}/memory{a}/firmware_node")


def test_acpi_blocks_have_firmware_node_and_physical_node_links():
    s = Sys(machine())
    dev = s.m.plug(256 * MiB, dev_id="d")
    a, b = dev.block_ids
    fw = s.node(f"{MEM}/memory{a}/firmware_node")
    assert fw.target == "../../../LNXSYSTM:00/LNXSYBUS:00/PNP0A06:04/PNP0C80:00"
    assert s.node(f"{LNX}/PNP0C80:00/physical_node1").target.endswith(f"memory{b}")


# ---------------------------------------------------------------- hwpoison
def hard(s: Sys, addr: int) -> int | None:
    return s.write(f"{MEM}/hard_offline_page", f"{addr:#x}\n".encode())


def soft(s: Sys, addr: int) -> int | None:
    return s.write(f"{MEM}/soft_offline_page", f"{addr:#x}\n".encode())


@pytest.mark.parametrize("kernel, online_err", [("6.6", EHWPOISON), ("6.19", EHWPOISON), ("6.1", None),
                                                 ("5.15", None), ("5.13", None)])
def test_hwpoison_offline_works_online_ehwpoison_from_6_2(kernel, online_err):
    s = Sys(machine(kernel))
    dev = s.m.plug(128 * MiB, dev_id="d")
    bid = dev.block_ids[0]
    s.state(bid, "online_movable")
    addr = bid * 128 * MiB + 5 * 4096 + 123  # a physical address, not a pfn
    assert hard(s, addr) is None
    assert s.m.meminfo()["HardwareCorrupted"] == 4
    assert hard(s, addr) is None  # already poisoned: success, counted once
    assert s.m.meminfo()["HardwareCorrupted"] == 4
    assert s.state(bid, "offline") is None
    before = snapshot(s.m)
    err = s.state(bid, "online_movable")
    assert err == online_err
    if err:
        assert EHWPOISON == 133
        assert snapshot(s.m) == before and s.read(f"{MEM}/memory{bid}/state") == "offline\n"
        assert s.write(f"{MEM}/memory{bid}/online", b"1") == EHWPOISON
    else:
        mov = s.m.nodes[0].zone("Movable")
        assert mov.used == 1  # the poisoned page stays out of use


def test_soft_offline_page_refusals():
    s = Sys(machine())
    s.m.plug(128 * MiB, dev_id="d")  # memory32, offline
    assert soft(s, 32 * 128 * MiB) == errno.EIO
    assert hard(s, 32 * 128 * MiB) == errno.ENXIO
    assert soft(s, 1 << 45) == errno.ENXIO  # no memory there
    assert hard(s, 1 << 45) == errno.ENXIO
    assert s.write(f"{MEM}/soft_offline_page", b"nope") == errno.EINVAL
    assert soft(s, 2 * 128 * MiB) is None  # online boot page
    assert s.m.meminfo()["HardwareCorrupted"] == 4


def test_hwpoison_in_memory0_is_accounted_in_the_right_zone():
    s = Sys(machine())
    dma, dma32 = s.m.nodes[0].zone("DMA"), s.m.nodes[0].zone("DMA32")
    u0, u1 = dma.used, dma32.used
    assert hard(s, 0x200000) is None  # pfn 0x200: DMA part of memory0
    assert hard(s, 0x2000000) is None  # pfn 0x2000: DMA32 part of memory0
    assert (dma.used - u0, dma32.used - u1) == (1, 1)


def test_removing_poisoned_memory_clears_the_poison():
    """The memmap (and with it PG_hwpoison / the block's counter) goes at removal: the
    HardwareCorrupted count drops and memory re-added at the same address is clean."""
    s = Sys(machine())
    dev = s.m.plug(128 * MiB, dev_id="d", addr=8 * GiB)
    bid = dev.block_ids[0]
    s.state(bid, "online_movable")
    assert hard(s, 8 * GiB) is None
    s.state(bid, "offline")
    s.m.unplug("d")
    assert s.m.meminfo()["HardwareCorrupted"] == 0
    s.m.plug(128 * MiB, dev_id="d2", addr=8 * GiB)
    assert s.state(bid, "online_movable") is None
    assert s.m.nodes[0].zone("Movable").used == 0
    assert hard(s, 8 * GiB) is None  # poisons the new page
    assert s.m.nodes[0].zone("Movable").used == 1 and s.m.meminfo()["HardwareCorrupted"] == 4


def test_virtio_mem_failing_part_way_keeps_what_it_plugged():
    """virtio-mem plugs and adds one block at a time; when adding one fails (here: no RAM
    for its memmap) the device keeps the blocks it has, and can still be unplugged."""
    m = machine(**{"boot.memmap_on_memory": False, "boot.memhp_default_state": "online_movable"})
    free = m.meminfo()["MemFree"] // 4
    m.alloc("unmovable", (free - 600) * 4096)  # room for one block's memmap (512 pages)
    with pytest.raises(OSError) as ei:
        m.plug(512 * MiB, driver="virtio_mem", dev_id="vm0")
    assert ei.value.errno == errno.ENOMEM
    dev = m.devices["vm0"]
    assert dev.block_ids == [32] and m.blocks[32].state == "online"
    assert {b.id for b in m.blocks.values() if not b.boot} == {32}
    m.unplug("vm0")
    assert "vm0" not in m.devices and 32 not in m.blocks
