"""Replay the arm64 reference traces (Debian 6.1.0-57-arm64, QEMU virt, 1 GiB at 0x40000000,
tests/conformance/data/arm64-6.1) through the model, dump by dump, exactly.

The machine is tests/conformance/machines/arm64-virt-6.1.toml: RAM, the firmware's nomap
regions, the CMA area and the kernel pages at the bottom of RAM as the trace shows them.
What the trace holds and the model must give: every block DMA (ZONE_DMA is all RAM below
4 GiB, arch/arm64/mm/init.c max_zone_phys()); DMA32, Normal and Movable empty; offlining
fails in offline_pages()'s order: memory0 and memory15 EINVAL (memory holes), memory8
and memory14 EBUSY (isolation: kernel pages, CMA), memory9-13 EPERM (arm64's boot-memory
notifier); the DIMMs sit in their ACPI slots without memory (no CONFIG_ACPI_HOTPLUG_MEMORY),
the guest's eject fails ENODEV and QMP device_del ejects them.
"""
import errno

import pytest

from .replayer import Replayer, replay
from .traces import Write, load_trace

KERNEL = "arm64-6.1"


@pytest.mark.parametrize("name", ["a_memmap_on", "b_memmap_off"])
def test_arm64_trace_replays_exactly(name):
    r, problems, _ = replay(load_trace(name, kernel=KERNEL))
    assert not problems, "\n".join(problems)
    assert r.pinned == []  # every EBUSY came from the description, none was pinned


def test_arm64_offline_errnos_are_the_kernels():
    """The trace's first offline of each boot block, in the kernel's order of checks."""
    trace = load_trace("a_memmap_on", kernel=KERNEL)
    first: dict[str, int | None] = {}
    for w in trace.of_type(Write):
        if w.attr == "state" and w.value == "offline" and w.block not in first:
            first[w.block] = w.errno
    assert first == {"memory15": errno.EINVAL, "memory14": errno.EBUSY, "memory13": errno.EPERM,
                     "memory12": errno.EPERM, "memory11": errno.EPERM, "memory10": errno.EPERM,
                     "memory9": errno.EPERM, "memory8": errno.EBUSY, "memory0": errno.EINVAL}


def test_arm64_boot_zone_and_memfree():
    """Boot dump of trace a: ZONE_DMA from 0x4000000 (the flash bank is memblock memory) to
    2 GiB, its CMA pages, and MemFree (trace b's is 40 kB lower: boot noise)."""
    trace = load_trace("a_memmap_on", kernel=KERNEL)
    r = Replayer(trace)
    boot = trace.boot
    dma = r.machine.nodes[0].zone("DMA")
    assert (dma.start_pfn, dma.spanned, dma.present, dma.managed, dma.cma) == (16384, 507904, 278528, 247848, 16384)
    assert {k: boot.zones["DMA"][k] for k in ("start_pfn", "spanned", "present", "managed")} == {
        "start_pfn": 16384, "spanned": 507904, "present": 278528, "managed": 247848}
    assert "\n        cma      16384\n" in boot.files["/proc/zoneinfo"]["text"]
    assert "\n        cma      16384\n" in r.read("/proc/zoneinfo")
    assert r.machine.meminfo()["MemFree"] == boot.mem_free == 949372
    assert [r.read(f"/sys/devices/system/memory/memory{b}/valid_zones") for b in (0, *range(8, 16))] == ["DMA\n"] * 9
