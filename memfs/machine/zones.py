"""struct zone and struct pglist_data, reduced to what hotplug accounting touches."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

ZONE_NORMAL = "Normal"
ZONE_MOVABLE = "Movable"
ZONE_DEVICE = "Device"


@dataclass(eq=False)
class Zone:
    nid: int
    idx: int
    name: str
    limit_pfn: int | None = None  # boot RAM below this pfn lands here (low zones)
    start_pfn: int = 0
    spanned: int = 0
    present: int = 0
    present_early: int = 0  # boot memory: the auto-movable ratio's kernel allowance
    managed: int = 0
    used: int = 0  # managed pages handed out (kernel, memmap, user allocations)
    vmemmap: int = 0  # memmap_on_memory pages: present, not managed
    reserved_boot: int = 0  # memblock reservations at boot: present, never managed
    cma: int = 0
    # free pages held on the zone's per-cpu lists, which NR_FREE_PAGES (MemFree) does not
    # count: the lists fill when the zone is first populated, an offline drains them
    pcp: int = 0
    # ids of online blocks with pages in this zone, sorted: O(log n) span shrinking
    members: list[int] = field(default_factory=list)

    @property
    def end_pfn(self) -> int:
        return self.start_pfn + self.spanned

    @property
    def is_movable(self) -> bool:
        return self.name == ZONE_MOVABLE

    @property
    def is_kernel(self) -> bool:
        return self.name not in (ZONE_MOVABLE, ZONE_DEVICE)

    @property
    def free(self) -> int:
        """Pages not in use (the per-cpu lists' ones included): what allocations may take."""
        return self.managed - self.used

    @property
    def nr_free_pages(self) -> int:
        """NR_FREE_PAGES: free pages in the buddy allocator (zoneinfo, vmstat, MemFree)."""
        return self.free - min(self.pcp, self.free)

    def populated(self) -> bool:
        return self.present > 0

    def is_empty(self) -> bool:
        return self.spanned == 0

    def intersects(self, start_pfn: int, nr_pages: int) -> bool:
        """zone_intersects(): spans only; an empty zone intersects nothing."""
        if self.is_empty():
            return False
        return not (start_pfn >= self.end_pfn or start_pfn + nr_pages <= self.start_pfn)

    def resize_range(self, start_pfn: int, nr_pages: int) -> None:
        """resize_zone_range(): grow the span to cover [start, start + nr)."""
        end = start_pfn + nr_pages
        if self.is_empty() or start_pfn < self.start_pfn:
            old_end = self.end_pfn if not self.is_empty() else end
            self.start_pfn = start_pfn
            self.spanned = max(old_end, end) - start_pfn
        else:
            self.spanned = max(self.end_pfn, end) - self.start_pfn

    def add_member(self, block_id: int) -> None:
        bisect.insort(self.members, block_id)

    def remove_member(self, block_id: int) -> None:
        i = bisect.bisect_left(self.members, block_id)
        if i < len(self.members) and self.members[i] == block_id:
            del self.members[i]


@dataclass(eq=False)
class Node:
    id: int
    zones: list[Zone]
    cpus: bool = True
    cpu_ids: tuple[int, ...] = ()  # nodeN/cpulist
    online: bool = False
    # memory block ids linked to this node (sysfs nodeN/memoryM), insertion-ordered set
    blocks: dict[int, None] = field(default_factory=dict)

    def zone(self, name: str) -> Zone:
        for z in self.zones:
            if z.name == name:
                return z
        raise KeyError(name)

    @property
    def present(self) -> int:
        return sum(z.present for z in self.zones)

    @property
    def managed(self) -> int:
        return sum(z.managed for z in self.zones)

    @property
    def used(self) -> int:
        return sum(z.used for z in self.zones)

    @property
    def nr_free_pages(self) -> int:
        return sum(z.nr_free_pages for z in self.zones)

    def has_memory(self) -> bool:
        """N_MEMORY."""
        return any(z.present for z in self.zones)

    def has_normal_memory(self) -> bool:
        """N_NORMAL_MEMORY: present pages in a kernel zone."""
        return any(z.present for z in self.zones if z.is_kernel)

    def span(self) -> tuple[int, int]:
        """node_start_pfn, node_spanned_pages, from the non-empty zone spans."""
        spans = [(z.start_pfn, z.end_pfn) for z in self.zones if not z.is_empty()]
        if not spans:
            return 0, 0
        lo = min(s for s, _ in spans)
        return lo, max(e for _, e in spans) - lo


def make_zones(nid: int, low_zones: tuple[tuple[str, int], ...], page_shift: int) -> list[Zone]:
    zones = [Zone(nid, i, name, limit >> page_shift) for i, (name, limit) in enumerate(low_zones)]
    for name in (ZONE_NORMAL, ZONE_MOVABLE, ZONE_DEVICE):
        zones.append(Zone(nid, len(zones), name))
    return zones


U32_MAX = (1 << 32) - 1
PHYS_ADDR_MAX = (1 << 64) - 1


def arm64_zone_limits(dram_start: int, dram_end: int, fw_limit: int | None, zone_dma_limit: bool) -> tuple[int, int]:
    """Ends (exclusive, bytes) of ZONE_DMA and ZONE_DMA32 on arm64: arch/arm64/mm/init.c
    zone_sizes_init() and max_zone_phys().

    `fw_limit` is the firmware's DMA limit, end exclusive (None: no dma-ranges/IORT limit, the
    kernel sees PHYS_ADDR_MAX). 5.11-6.11 (`zone_dma_limit` False) turn it into
    zone_dma_bits = min(32, fls64(max cpu address)), and max_zone_phys(bits) widens the
    zone to all of RAM when RAM starts above 4 GiB, and to 4 GiB when it starts above the
    bits' reach (791ab8b2e3db, "Ignore any DMA offsets in the max_zone_phys() calculation").
    6.12+ take the limit as an address and only cap it at 4 GiB when RAM starts below.
    Zones stack (free_area_init() takes max(limit, start of the zone)), so a DMA32 limit
    at or below ZONE_DMA's end leaves ZONE_DMA32 empty.
    """
    last = dram_end - 1
    fw_max = PHYS_ADDR_MAX if fw_limit is None else fw_limit - 1
    if zone_dma_limit:
        zl = min(fw_max, U32_MAX) if dram_start < U32_MAX else fw_max
        dma = min(zl, last) + 1
        dma32 = min(U32_MAX, last) + 1
    else:
        def max_zone_phys(bits: int) -> int:
            mask = (1 << bits) - 1
            if dram_start > U32_MAX:
                mask = PHYS_ADDR_MAX
            elif dram_start > mask:
                mask = U32_MAX
            return min(mask, last) + 1

        dma = max_zone_phys(min(32, fw_max.bit_length()))
        dma32 = max_zone_phys(32)
    return dma, dma32
