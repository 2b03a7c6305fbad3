"""The hotplug window as QEMU places it, and the ACPI memory hotplug build switch (docs/machine.md).

QEMU 7.2: hw/i386/pc.c pc_memory_init() puts the device-memory region at
ROUND_UP(4 GiB + above_4g_mem_size, 1 GiB); hw/arm/virt.c virt_set_memmap() at
ROUND_UP(RAM base + ram_size, 1 GiB). The arm64 reference guest (QEMU virt, 1 GiB at
0x40000000) shows the SRAT hotplug range 0x80000000-0x63fffffff and dimm1 at 0x80000000.
"""
from __future__ import annotations

import errno

import pytest

from memfs.machine.config import ConfigError, from_dict, load_config
from memfs.machine.hotplug import Machine

from tests.support.sysroot import Sysroot

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40


def cfg(**top):
    d = {"node": [{"id": 0, "ram": ["0x100000-0x40000000"]}]}
    d.update(top)
    return from_dict(d)


def test_reference_vm_window_is_at_4g():
    c = load_config(None)
    assert (c.hotplug_base, c.hotplug_size) == (4 * GiB, 23 * GiB)


def test_arm64_virt_window_follows_ram():
    c = cfg(arch="arm64-4k", node=[{"id": 0, "ram": ["0x40000000-0x80000000"]}])
    assert c.hotplug_base == 0x80000000


def test_x86_window_after_ram_above_4g_rounded_to_a_gib():
    c = cfg(node=[{"id": 0, "ram": ["0x100000-0xc0000000", "0x100000000-0x340000000"]}])  # 12 GiB
    assert c.hotplug_base == 13 * GiB
    c = cfg(node=[{"id": 0, "ram": ["0x100000-0xc0000000", "0x100000000-0x338000000"]}])  # ends at 12.875 GiB
    assert c.hotplug_base == 13 * GiB


def test_explicit_base_is_kept():
    c = cfg(hotplug={"base": "64G"})
    assert c.hotplug_base == 64 * GiB


def test_window_rounded_up_to_the_block_size():
    """Bare metal probing gives 2 GiB blocks; RAM ends on an odd GiB -> the next 2 GiB."""
    c = cfg(hypervisor=False, hotplug={"size": "24G"}, node=[{"id": 0, "ram": ["0x100000-0xc0000000", "0x100000000-0x1040000000"]}])
    assert (c.block_size, c.hotplug_base) == (2 * GiB, 66 * GiB)


def eight_tib(**top) -> Machine:
    """3 GiB below the PCI hole, the rest of 8 TiB above 4 GiB: RAM ends at 8 TiB + 1 GiB."""
    return Machine(cfg(node=[{"id": 0, "ram": ["0x100000-0xc0000000", f"{4 * GiB:#x}-{8 * TiB + GiB:#x}"]}],
                       **top))


def test_plug_on_an_8_tib_machine():
    m = eight_tib()
    assert m.block_size == GiB  # x86 VM probing: largest power of two (<= 2G) the end is aligned to
    assert m.cfg.hotplug_base == 8 * TiB + GiB
    dev = m.plug(2 * GiB)
    assert (dev.start, dev.block_ids) == (8 * TiB + GiB, [8 * 1024 + 1, 8 * 1024 + 2])
    assert all(m.blocks[b].state == "offline" for b in dev.block_ids)


def test_a_window_inside_boot_ram_still_fails_as_on_linux():
    """An explicit base the RAM covers: add_memory() finds the range busy."""
    m = eight_tib(hotplug={"base": "4T"})
    with pytest.raises(OSError) as e:
        m.plug(GiB)
    assert e.value.errno == errno.EEXIST and "overlaps present memory" in e.value.strerror


# ---------------------------------------------------------------- CONFIG_ACPI_HOTPLUG_MEMORY
def arm64(**top) -> Machine:
    return Machine(cfg(arch="arm64-4k", node=[{"id": 0, "ram": ["0x40000000-0x80000000"]}], **top))


def test_arm64_acpi_dimm_gives_no_memory_by_default():
    """Debian arm64 (CONFIG_ACPI_HOTPLUG_MEMORY unset): QEMU's DIMM takes a slot (status 15,
    _OST success) but no driver binds it; the guest's eject write fails ENODEV; QMP
    device_del ejects it anyway (_OST 0x84 then 0), as the arm64 reference trace shows."""
    m = arm64()
    s = Sysroot(m)
    assert m.cfg.acpi_memory_hotplug is False
    dev = m.plug(128 * MiB)
    assert (dev.slot, dev.block_ids, dev.start) == (0, [], 0x80000000)
    assert max(m.blocks) == 15 and m.meminfo()["MemTotal"] == 1 << 20
    assert s.read("/sys/devices/LNXSYSTM:00/LNXSYBUS:00/PNP0A06:04/PNP0C80:00/status") == "15\n"
    assert s.tree.resolve("/sys/devices/LNXSYSTM:00/LNXSYBUS:00/PNP0A06:04/PNP0C80:00").names() == ["eject", "hid", "path", "status", "uid"]
    assert s.write("/sys/devices/LNXSYSTM:00/LNXSYBUS:00/PNP0A06:04/PNP0C80:00/eject", b"1\n") == errno.ENODEV
    m.unplug(dev.id)
    assert not m.devices and [(o.source, o.status) for o in m.ost_log] == [(1, 0), (3, 0x84), (3, 0)]
    assert m.plug(128 * MiB, driver="virtio_mem").block_ids == [16]


def test_arm64_acpi_memory_hotplug_on_request():
    m = arm64(acpi_memory_hotplug=True)
    assert m.plug(128 * MiB).block_ids == [16]


def test_x86_has_acpi_memory_hotplug_by_default():
    assert load_config(None).acpi_memory_hotplug is True
    m = Machine(load_config(None, overrides={"acpi_memory_hotplug": False}))
    assert [d.block_ids for d in m.devices.values()] == [[], [], []] and max(m.blocks) == 7


@pytest.mark.parametrize("top, message", [
    ({"acpi_memory_hotplug": "maybe"}, "^acpi_memory_hotplug: expected true or false"),
    ({"dma_limit": "1G"}, "^dma_limit: only arm64"),
    ({"arch": "arm64-4k", "node": [{"id": 0, "ram": ["0x40000000-0x80000000"]}], "dma_limit": 0},
     "^dma_limit: \"none\""),
    ({"reserve": [{"range": "0x40000000-0x40200000", "kind": "kernel"}]}, r"^reserve\[0\]\.range: .* inside one"),
    ({"reserve": [{"range": "0x200000-0x400000", "kind": "bios"}]}, r"^reserve\[0\]\.kind: one of kernel"),
    ({"reserve": [{"kind": "cma"}]}, r"^reserve\[0\]\.range: every \[\[reserve\]\] needs a range"),
    ({"reserve": [{"range": "0x200000-0x400000"}, {"range": "0x300000-0x500000"}]},
     r"^reserve\[1\]\.range: .* overlaps another"),
    ({"node": [{"id": 0, "ram": ["0x100000-0x40000000"], "nomap": ["0x200000-0x300000"]}]},
     "overlaps node 0 ram"),
])
def test_layout_keys_refused_with_the_key(top, message):
    d = {"node": [{"id": 0, "ram": ["0x100000-0x40000000"]}]}
    d.update(top)
    with pytest.raises(ConfigError, match=message):
        from_dict(d)
