"""Kernel-version and architecture differences, as data.

Each behaviour that changed between kernel releases is a field here, so the model
asks ``profile.memmap_split_per_block`` instead of comparing version strings.
Version attribution follows docs/conformance.md ("Kernel semantics by release").
The kstrtobool alphabet follows the profile name (memfs.sysfs.parse.kstrtobool_alphabet_for).

A profile also carries the boot numbers of the Debian build it was checked against
(``BootCalibration``): what that kernel image reserves early and has in use once booted
cannot be derived from the hotplug code, so it is measured (docs/conformance.md).
"""
from __future__ import annotations

import re
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
    # 5.16: virtio_mem_sbm_unplug_request() unplugs ZONE_MOVABLE blocks before kernel-zone
    # ones; before, all online blocks were tried alike, from the highest down
    virtio_mem_movable_first: bool
    # 5.13 (mm/page_alloc.c pcp_allowed_order): order-9 (pageblock) pages are kept on the
    # per-cpu lists, which NR_FREE_PAGES (MemFree) does not count
    pcp_pageblock_order: bool = True
    # pages a newly populated zone's per-cpu lists take at once (measured, docs/conformance.md)
    pcp_fill_pages: int = 112
    # 6.12: arm64 sizes ZONE_DMA from zone_dma_limit (an address) instead of zone_dma_bits
    # ("dma-mapping: replace zone_dma_bits by zone_dma_limit", with "arm64: mm: fix DMA zone
    # when dma-ranges is missing" of 6.12.y); before, max_zone_phys() took a bit count
    arm64_zone_dma_limit: bool = False


@dataclass(frozen=True)
class BootCalibration:
    """Boot numbers of one real kernel build on the reference VM (docs/conformance.md).

    ``early_reserved`` pages are memblock reservations other than the memmap of boot RAM
    and x86's first MiB: the kernel image, the 64 MiB SWIOTLB bounce buffer, early page
    tables, per-cpu areas, ACPI tables... (zone ``managed`` = ``present`` minus these).
    ``used`` pages are managed pages the booted kernel holds (slab, page cache of the
    initramfs, per-cpu lists), measured with every hot-plugged memmap on its own block."""
    build: str
    early_reserved: int
    used: int


#: the builds recorded under QEMU (tests/conformance/data/<kernel>/kernel-info.txt)
DEBIAN_6_1 = BootCalibration("Debian 6.1.0-56-amd64 (6.1.192-2)", early_reserved=28905, used=9181)
DEBIAN_6_12 = BootCalibration("Debian 6.12.117+deb13-amd64 (6.12.117-1)", early_reserved=27195, used=7585)
DEBIAN_7_2 = BootCalibration("Debian 7.2.13+deb14-amd64 (7.2.13-1)", early_reserved=28258, used=9339)


def _p(name: str, **kw: object) -> KernelProfile:
    base = dict(
        memmap_on_memory=True, memmap_force=False, memmap_split_per_block=False,
        acpi_always_requests=False, dax_kmem_memmap=False, online_policy=True,
        cached_zone=True, hwpoison_online=True, vmstat_memmap=False, crash_hotplug=False,
        toggles_normal_memory=True, mf_stats=True, acpi_container_online=True,
        virtio_mem_movable_first=True,
    )
    base.update(kw)
    return KernelProfile(name=name, **base)  # type: ignore[arg-type]


PROFILES: dict[str, KernelProfile] = {
    "5.12": _p("5.12", memmap_on_memory=False, online_policy=False, cached_zone=False,
               hwpoison_online=False, pcp_pageblock_order=False, mf_stats=False,
               acpi_container_online=False, virtio_mem_movable_first=False),
    "5.13": _p("5.13", online_policy=False, cached_zone=False, hwpoison_online=False, mf_stats=False,
               acpi_container_online=False, virtio_mem_movable_first=False),
    "5.15": _p("5.15", cached_zone=False, hwpoison_online=False, mf_stats=False, acpi_container_online=False,
               virtio_mem_movable_first=False),
    # EHWPOISON on online needs the per-memory_block hwpoison counter (mm/memory-failure.c,
    # drivers/base/memory.c memory_block_online()); it was merged for 6.2, so 6.1 onlines such blocks.
    "6.1": _p("6.1", hwpoison_online=False, mf_stats=False, acpi_container_online=False),
    "6.6": _p("6.6", memmap_force=True, acpi_always_requests=True, crash_hotplug=True,
              acpi_container_online=False),
    "6.8": _p("6.8", memmap_force=True, acpi_always_requests=True, crash_hotplug=True,
              memmap_split_per_block=True, dax_kmem_memmap=True),
    "6.12": _p("6.12", memmap_force=True, acpi_always_requests=True, crash_hotplug=True,
               memmap_split_per_block=True, dax_kmem_memmap=True, vmstat_memmap=True, arm64_zone_dma_limit=True),
    "6.19": _p("6.19", memmap_force=True, acpi_always_requests=True, crash_hotplug=True,
               memmap_split_per_block=True, dax_kmem_memmap=True, vmstat_memmap=True,
               toggles_normal_memory=False, arm64_zone_dma_limit=True),
    "7.2": _p("7.2", memmap_force=True, acpi_always_requests=True, crash_hotplug=True,
              memmap_split_per_block=True, dax_kmem_memmap=True, vmstat_memmap=True,
              toggles_normal_memory=False, arm64_zone_dma_limit=True),
}
DEFAULT_KERNEL = "6.1"

#: boot numbers per profile; a profile without a recorded build borrows the nearest
#: older one (5.12-6.8: 6.1; 6.19: 6.12), which docs/conformance.md says
BOOT_CALIBRATION: dict[str, BootCalibration] = {
    "5.12": DEBIAN_6_1, "5.13": DEBIAN_6_1, "5.15": DEBIAN_6_1, "6.1": DEBIAN_6_1,
    "6.6": DEBIAN_6_1, "6.8": DEBIAN_6_1, "6.12": DEBIAN_6_12, "6.19": DEBIAN_6_12,
    "7.2": DEBIAN_7_2,
}
#: profiles checked against a recording of a real kernel (the others: sources only)
RECORDED = {"6.1": DEBIAN_6_1, "6.12": DEBIAN_6_12, "7.2": DEBIAN_7_2}


def _version(name: str) -> tuple[int, int]:
    major, minor = name.split(".")
    return int(major), int(minor)


def resolve_kernel(text: str) -> tuple[str, str | None]:
    """A profile name, or a release string (``uname -r``: ``6.12.117+deb13-amd64``,
    ``7.2.13``, ``6.1.0-56-amd64``) -> (profile, note). The covering profile is the newest
    one not newer than the release's major.minor; the note says which was picked (None
    when ``text`` is a profile name). ValueError when nothing covers it."""
    text = text.strip()
    if text in PROFILES:
        return text, None
    m = re.match(r"v?(\d+)\.(\d+)(?:[.\-+~_][0-9A-Za-z.+~_\-]*)?$", text)
    if not m:
        raise ValueError(f"unknown profile {text!r}; give a profile ({', '.join(PROFILES)}) "
                         f"or a release such as 6.12.117+deb13-amd64")
    want = (int(m.group(1)), int(m.group(2)))
    older = [p for p in PROFILES if _version(p) <= want]
    if not older:
        raise ValueError(f"{text} is older than the oldest profile ({min(PROFILES, key=_version)}); "
                         f"memory hotplug before 5.12 is not modelled")
    name = max(older, key=_version)
    how = "exact release line" if _version(name) == want else f"newest profile not newer than {want[0]}.{want[1]}"
    return name, f"kernel {text}: profile {name} ({how})"

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class ArchProfile:
    name: str
    page_size: int
    pmd_size: int
    pageblock_pages: int
    section_size: int
    # (zone name, exclusive upper limit in bytes) for the zones below ZONE_NORMAL; arm64's
    # limits depend on the machine and are computed at boot (zones.arm64_zone_limits())
    low_zones: tuple[tuple[str, int], ...]

    @property
    def page_shift(self) -> int:
        return self.page_size.bit_length() - 1


ARCHES: dict[str, ArchProfile] = {
    "x86_64": ArchProfile("x86_64", 4096, 2 * MiB, 512, 128 * MiB,
                          (("DMA", 16 * MiB), ("DMA32", 4 * GiB))),
    "arm64-4k": ArchProfile("arm64-4k", 4096, 2 * MiB, 512, 128 * MiB, (("DMA", 4 * GiB), ("DMA32", 4 * GiB))),
    "arm64-16k": ArchProfile("arm64-16k", 16384, 32 * MiB, 2048, 128 * MiB, (("DMA", 4 * GiB), ("DMA32", 4 * GiB))),
    "arm64-64k": ArchProfile("arm64-64k", 65536, 512 * MiB, 8192, 512 * MiB, (("DMA", 4 * GiB), ("DMA32", 4 * GiB))),
}
DEFAULT_ARCH = "x86_64"
