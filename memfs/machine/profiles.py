"""Kernel-version and architecture differences, as data.

Each behaviour that changed between kernel releases is a field here, so the model
asks ``profile.memmap_split_per_block`` instead of comparing version strings.
Each field names the release that changed the behaviour and the kernel code behind it;
docs/machine.md has the table.
The kstrtobool alphabet follows the profile name (memfs.sysfs.parse.kstrtobool_alphabet_for).
"""
from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class KernelProfile:
    name: str
    memmap_on_memory: bool  # the 5.13 patchset: boot param and altmap support exist
    memmap_force: bool  # 6.6: "force" mode, computed memmap pages, silent fallback
    memmap_split_per_block: bool  # 6.8: multi-block adds get one altmap per block
    acpi_always_requests: bool  # 6.6: ACPI asks even when the size check would fail
    dax_kmem_memmap: bool  # 6.8: dax/kmem per-device memmap_on_memory switch
    online_policy: bool  # 5.15: online_policy / auto_movable_* params, memory groups
    cached_zone: bool  # 5.18: zone cached at online; multi-zone offline refused up front
    hwpoison_online: bool  # 6.2: per-block hwpoison counter, onlining such a block fails EHWPOISON
    vmstat_memmap: bool  # 6.11: nr_memmap_pages / nr_memmap_boot_pages in /proc/vmstat
    crash_hotplug: bool  # 6.6: /sys/devices/system/memory/crash_hotplug
    toggles_normal_memory: bool  # up to 6.16: hotplug maintains N_NORMAL_MEMORY
    # nodeN/memory_failure/{total,ignored,failed,delayed,recovered}: mm/memory-failure.c
    # memory_failure_attr_group, 2023 (Documentation/ABI/stable/sysfs-devices-node); absent
    # from the 6.1 traces, present in the 6.12 and 7.2 ones
    mf_stats: bool
    # a Device Check on a memory device rescans its parent, the PNP0A06 container, whose scan
    # handler's notify_online (drivers/acpi/container.c container_device_online()) sends
    # KOBJ_ONLINE: drivers/acpi/scan.c acpi_scan_device_check() after the 6.8 rework of
    # Device/Bus Check handling. 6.1 traces: no such event; 6.12 and 7.2: one per DIMM hot-add
    acpi_container_online: bool


def _p(name: str, **kw: object) -> KernelProfile:
    base = dict(
        memmap_on_memory=True, memmap_force=False, memmap_split_per_block=False,
        acpi_always_requests=False, dax_kmem_memmap=False, online_policy=True,
        cached_zone=True, hwpoison_online=True, vmstat_memmap=False, crash_hotplug=False,
        toggles_normal_memory=True, mf_stats=True, acpi_container_online=True,
    )
    base.update(kw)
    return KernelProfile(name=name, **base)  # type: ignore[arg-type]


PROFILES: dict[str, KernelProfile] = {
    "5.12": _p("5.12", memmap_on_memory=False, online_policy=False, cached_zone=False,
               hwpoison_online=False, mf_stats=False, acpi_container_online=False),
    "5.13": _p("5.13", online_policy=False, cached_zone=False, hwpoison_online=False, mf_stats=False,
               acpi_container_online=False),
    "5.15": _p("5.15", cached_zone=False, hwpoison_online=False, mf_stats=False, acpi_container_online=False),
    # EHWPOISON on online needs the per-memory_block hwpoison counter (mm/memory-failure.c,
    # drivers/base/memory.c memory_block_online()); it was merged for 6.2, so 6.1 onlines such blocks.
    "6.1": _p("6.1", hwpoison_online=False, mf_stats=False, acpi_container_online=False),
    "6.6": _p("6.6", memmap_force=True, acpi_always_requests=True, crash_hotplug=True,
              acpi_container_online=False),
    "6.8": _p("6.8", memmap_force=True, acpi_always_requests=True, crash_hotplug=True,
              memmap_split_per_block=True, dax_kmem_memmap=True),
    "6.12": _p("6.12", memmap_force=True, acpi_always_requests=True, crash_hotplug=True,
               memmap_split_per_block=True, dax_kmem_memmap=True, vmstat_memmap=True),
    "6.19": _p("6.19", memmap_force=True, acpi_always_requests=True, crash_hotplug=True,
               memmap_split_per_block=True, dax_kmem_memmap=True, vmstat_memmap=True,
               toggles_normal_memory=False),
}
DEFAULT_KERNEL = "6.1"

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class ArchProfile:
    name: str
    page_size: int
    pmd_size: int
    pageblock_pages: int
    section_size: int
    # (zone name, exclusive upper limit in bytes) for the zones below ZONE_NORMAL
    low_zones: tuple[tuple[str, int], ...]

    @property
    def page_shift(self) -> int:
        return self.page_size.bit_length() - 1


ARCHES: dict[str, ArchProfile] = {
    "x86_64": ArchProfile("x86_64", 4096, 2 * MiB, 512, 128 * MiB,
                          (("DMA", 16 * MiB), ("DMA32", 4 * GiB))),
    "arm64-4k": ArchProfile("arm64-4k", 4096, 2 * MiB, 512, 128 * MiB, (("DMA", 4 * GiB),)),
    "arm64-16k": ArchProfile("arm64-16k", 16384, 32 * MiB, 2048, 128 * MiB, (("DMA", 4 * GiB),)),
    "arm64-64k": ArchProfile("arm64-64k", 65536, 512 * MiB, 8192, 512 * MiB, (("DMA", 4 * GiB),)),
}
DEFAULT_ARCH = "x86_64"
