"""Boot zone layouts per architecture and release, and offline_pages()'s order of checks.

arm64: arch/arm64/mm/init.c zone_sizes_init()/max_zone_phys(): 5.11-6.11 take
zone_dma_bits = min(32, fls64(firmware limit)) and widen ZONE_DMA to all RAM when RAM
starts above 4 GiB (and to 4 GiB when it starts above the bits' reach); 6.12+ take the
limit as an address, capped at 4 GiB only when RAM starts below 4 GiB.
"""
from __future__ import annotations

import errno

import pytest

from memfs.machine.config import from_dict
from memfs.machine.hotplug import Machine
from memfs.machine.zones import arm64_zone_limits

from tests.support.sysroot import Sysroot

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
PAGE = 4096


def arm64(ram: list[str], kernel: str = "6.1", **top) -> Machine:
    return Machine(from_dict({"kernel": kernel, "arch": "arm64-4k", "node": [{"id": 0, "ram": ram}], **top}))


def spans(m: Machine) -> dict[str, tuple[int, int]]:
    """zone -> (start, end) in bytes, populated zones only."""
    return {z.name: (z.start_pfn * PAGE, z.end_pfn * PAGE) for z in m.nodes[0].zones if z.present}


@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
def test_arm64_ram_above_4g_is_all_dma(kernel):
    """An arm64 box whose RAM starts at 1 TiB: all boot memory in ZONE_DMA, valid_zones DMA."""
    m = arm64([f"{TiB:#x}-{TiB + 4 * GiB:#x}"], kernel)
    assert spans(m) == {"DMA": (TiB, TiB + 4 * GiB)}
    s = Sysroot(m)
    first = TiB // m.block_size
    assert {s.read(f"/sys/devices/system/memory/memory{b}/valid_zones") for b in range(first, first + 32)} == {"DMA\n"}


@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
def test_arm64_ram_from_zero_dma_is_the_low_4g(kernel):
    m = arm64(["0x0-0x200000000"], kernel)
    assert spans(m) == {"DMA": (0, 4 * GiB), "Normal": (4 * GiB, 8 * GiB)}
    assert m.nodes[0].zone("DMA32").present == 0  # its limit (4 GiB) is ZONE_DMA's end


@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
def test_arm64_firmware_dma_limit_of_1g(kernel):
    """A Raspberry Pi 4-like dma-ranges limit: ZONE_DMA 0-1 GiB, ZONE_DMA32 1-4 GiB."""
    m = arm64(["0x0-0x200000000"], kernel, dma_limit="1G")
    assert spans(m) == {"DMA": (0, GiB), "DMA32": (GiB, 4 * GiB), "Normal": (4 * GiB, 8 * GiB)}


def test_arm64_zone_dma_bits_round_the_limit_up_before_6_12():
    """A limit of 1.5 GiB: fls64(0x5fffffff) = 31 bits (2 GiB) before 6.12, the address from 6.12."""
    assert arm64(["0x0-0x100000000"], "6.1", dma_limit="0x60000000").nodes[0].zone("DMA").spanned * PAGE == 2 * GiB
    assert arm64(["0x0-0x100000000"], "6.12", dma_limit="0x60000000").nodes[0].zone("DMA").spanned * PAGE \
        == 0x60000000


def test_arm64_limit_below_ram_start_above_4g():
    """RAM at 8 GiB, firmware limit 4 GiB: 6.1 widens ZONE_DMA to all RAM; 6.12 keeps the
    limit, so ZONE_DMA and ZONE_DMA32 are empty and RAM is Normal."""
    assert spans(arm64(["0x200000000-0x300000000"], "6.1", dma_limit="4G")) == {"DMA": (8 * GiB, 12 * GiB)}
    assert spans(arm64(["0x200000000-0x300000000"], "6.12", dma_limit="4G")) == {"Normal": (8 * GiB, 12 * GiB)}


def test_arm64_limit_below_ram_start_below_4g():
    """RAM at 2 GiB, limit 1 GiB: before 6.12 ZONE_DMA widens to 4 GiB (start > mask)."""
    assert arm64_zone_limits(2 * GiB, 8 * GiB, GiB, False) == (4 * GiB, 4 * GiB)
    assert arm64_zone_limits(2 * GiB, 8 * GiB, GiB, True) == (GiB, 4 * GiB)


def test_arm64_reference_guest_layout():
    """QEMU virt, 1 GiB at 0x40000000: DMA up to 2 GiB, DMA32 empty (boot dump of the trace)."""
    assert arm64_zone_limits(0x4000000, 0x80000000, None, False) == (0x80000000, 0x80000000)


# ---------------------------------------------------------------- offline_pages() order
def arm64_layout(kernel: str = "6.1") -> Machine:
    """1 GiB at 0x40000000 with a nomap hole in memory15, CMA in memory14, reserved pages
    in memory8 and kernel pages in memory9; memory10-13 hold nothing."""
    return Machine(from_dict({
        "kernel": kernel, "arch": "arm64-4k",
        "node": [{"id": 0, "ram": ["0x40000000-0x7fc00000"], "nomap": ["0x7fc00000-0x80000000"]}],
        "reserve": [{"range": "0x40000000-0x40200000", "kind": "kernel"},
                    {"range": "0x48000000-0x48100000", "kind": "used"},
                    {"range": "0x74000000-0x78000000", "kind": "cma"}],
    }))


@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
def test_arm64_offline_in_the_kernels_order(kernel):
    m = arm64_layout(kernel)
    got = {}
    for b in range(8, 16):
        try:
            m.state_store(b, 0)
        except OSError as e:
            got[b] = e.errno
    assert got == {8: errno.EBUSY, 9: errno.EBUSY, 10: errno.EPERM, 11: errno.EPERM, 12: errno.EPERM,
                   13: errno.EPERM, 14: errno.EBUSY, 15: errno.EINVAL}
    z = m.nodes[0].zone("DMA")
    nomap, kernel_pages = 0x400000 // PAGE, 0x200000 // PAGE
    assert (z.present, z.managed, z.cma) == (GiB // PAGE, GiB // PAGE - nomap - kernel_pages, 0x4000000 // PAGE)


def test_arm64_hot_added_memory_goes_offline():
    """The boot-memory notifier looks at early sections only: virtio-mem blocks offline fine."""
    m = arm64_layout()
    dev = m.plug(128 * MiB, driver="virtio_mem")
    (b,) = dev.block_ids
    m.state_store(b, 1)
    m.state_store(b, 0)
    assert m.blocks[b].state == "offline"


def test_x86_cma_and_nomap_blocks():
    """The same checks on x86 (no notifier veto): CMA EBUSY, holes EINVAL, the rest offlines."""
    m = Machine(from_dict({
        "node": [{"id": 0, "ram": ["0x100000-0xbff00000"], "nomap": ["0xbff00000-0xc0000000"]}],
        "reserve": [{"range": "0x80000000-0x84000000", "kind": "cma"}],
    }))
    errs = {}
    for b in (16, 17, 23):
        try:
            m.state_store(b, 0)
            errs[b] = None
        except OSError as e:
            errs[b] = e.errno
    assert errs == {16: errno.EBUSY, 17: None, 23: errno.EINVAL}


# ---------------------------------------------------------------- x86: a real 16 GiB laptop
LAPTOP = {"node": [{"id": 0, "ram": [
    "0x1000-0x9f000",             # the low 640 KiB (less the BIOS data page)
    "0x100000-0x80000000",        # above the legacy hole (VGA, option ROMs, BIOS) to 2 GiB
    "0x100000000-0x46f800000",    # above the PCI hole; RAM ends inside memory141
]}]}


@pytest.mark.parametrize("kernel, last", [("5.12", "none"), ("5.13", "none"), ("5.15", "none"),
                                          ("6.1", "Normal"), ("6.12", "Normal"), ("7.2", "Normal")])
def test_x86_last_block_of_a_16g_laptop(kernel, last):
    """memory141 holds RAM up to 0x46f800000 and 8 MiB past it. test_pages_in_a_zone()
    (to 5.17) meets page 0x46f800 outside ZONE_NORMAL's span: "none"; from 5.18 the block's
    stored zone: "Normal". Offlining fails EINVAL (memory holes) on both."""
    m = Machine(from_dict({"kernel": kernel, **LAPTOP}))
    s = Sysroot(m)
    vz = {b: s.read(f"/sys/devices/system/memory/memory{b}/valid_zones").strip() for b in (0, 1, 15, 32, 140, 141)}
    assert vz == {0: "none", 1: "DMA32", 15: "DMA32", 32: "Normal", 140: "Normal", 141: last}
    assert not s.exists("/sys/devices/system/memory/memory16")  # the PCI hole has no blocks
    assert s.write("/sys/devices/system/memory/memory141/state", b"offline") == errno.EINVAL
    assert m.cfg.hotplug_base == 18 * GiB  # QEMU-like placement: after the RAM, 1 GiB aligned


def test_x86_ram_ending_on_a_max_order_boundary_near_the_end():
    """Only pages at 4 MiB steps are looked at: RAM ending 2 MiB before the block's end
    leaves every looked-at page inside ZONE_NORMAL, so 5.15 prints Normal too."""
    ram = ["0x100000-0x80000000", "0x100000000-0x47fe00000"]
    m = Machine(from_dict({"kernel": "5.15", "node": [{"id": 0, "ram": ram}]}))
    assert Sysroot(m).read("/sys/devices/system/memory/memory143/valid_zones") == "Normal\n"


def test_x86_scan_after_offline_online_uses_the_zone():
    """A boot block that went offline and online again is a plain block of its zone."""
    m = Machine(from_dict({"kernel": "5.15", **LAPTOP}))
    m.state_store(140, 0)
    m.state_store(140, 1)
    assert Sysroot(m).read("/sys/devices/system/memory/memory140/valid_zones") == "Normal\n"
