"""struct memory_block, struct memory_group, and the devices that add memory."""
from __future__ import annotations

from dataclasses import dataclass, field

from .zones import Zone

MEM_ONLINE = "online"
MEM_OFFLINE = "offline"
MEM_GOING_OFFLINE = "going-offline"

# enum mmop, in the order mhp_online_type_from_str() matches them
MMOP_OFFLINE, MMOP_ONLINE, MMOP_ONLINE_KERNEL, MMOP_ONLINE_MOVABLE = range(4)
ONLINE_TYPE_NAMES = ("offline", "online", "online_kernel", "online_movable")


@dataclass(eq=False)
class MemoryGroup:
    """Internal memory group (5.15+): ACPI DIMMs are static, virtio-mem dynamic."""
    id: int
    nid: int
    is_dynamic: bool
    max_pages: int = 0  # static: the whole device
    unit_pages: int = 0  # dynamic: the unit virtio-mem (un)plugs in
    present_kernel_pages: int = 0
    present_movable_pages: int = 0


@dataclass(eq=False)
class MemoryBlock:
    id: int
    start_pfn: int
    nr_pages: int
    nid: int
    state: str = MEM_OFFLINE
    dev_offline: bool = True  # driver core's dev->offline, what `online` shows
    online_type: int = MMOP_OFFLINE  # mem->online_type, set by `state` writes
    zone: Zone | None = None  # cached zone while online; None if spanning zones
    boot: bool = False  # early section: counts in present_early_pages
    present_pages: int = 0  # RAM pages (fewer than nr_pages if the block has holes)
    nr_vmemmap_pages: int = 0
    reserved: int = 0  # boot pages the kernel keeps (PageReserved: unmovable)
    nomap: int = 0  # of those, firmware memory outside System RAM: holes for offline_pages()
    cma: int = 0  # managed pages in the CMA area (MIGRATE_CMA pageblocks: never isolated for offline)
    unmovable: int = 0  # pages of unmovable allocations placed here
    movable: int = 0
    hwpoison: int = 0
    nids: tuple[int, ...] = ()  # nodes linked (a boot block may span two)
    group: MemoryGroup | None = None
    device: "HotplugDevice | None" = None
    allocs: dict[int, int] = field(default_factory=dict)  # allocation id -> pages here
    # boot blocks: pages per zone (by zone idx); the block is in several zones if >1
    boot_zone_pages: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    boot_reserved: dict[int, int] = field(default_factory=dict)  # zone idx -> reserved pages
    zone_used: dict[int, int] = field(default_factory=dict)  # spanning zones: zone idx -> pages used
    removed: bool = False

    @property
    def name(self) -> str:
        return f"memory{self.id}"

    @property
    def devpath(self) -> str:
        return f"/devices/system/memory/memory{self.id}"

    @property
    def end_pfn(self) -> int:
        return self.start_pfn + self.nr_pages

    @property
    def has_holes(self) -> bool:
        """offline_pages(): fewer "System RAM" pages (walk_system_ram_range()) than the block has."""
        return self.present_pages - self.nomap != self.nr_pages

    @property
    def free(self) -> int:
        """Free managed pages while online."""
        return (self.present_pages - self.nr_vmemmap_pages - self.reserved - self.unmovable - self.movable
                - self.hwpoison)

    def extent_in(self, zone: Zone) -> tuple[int, int] | None:
        """First and one-past-last pfn of this block's pages in `zone`."""
        if self.boot_zone_pages and zone.idx in self.boot_zone_pages:
            lo, hi, _ = self.boot_zone_pages[zone.idx]
            return lo, hi
        return (self.start_pfn, self.end_pfn) if self.zone is zone else None


@dataclass(eq=False)
class HotplugDevice:
    """What added the memory: an ACPI DIMM slot, a probe write, dax/kmem, virtio-mem."""
    id: str
    driver: str
    start: int  # bytes
    size: int
    nid: int
    slot: int | None = None  # ACPI PNP0C80 instance
    group: MemoryGroup | None = None
    block_ids: list[int] = field(default_factory=list)
    memmap_on_memory: bool = False  # the MHP_MEMMAP_ON_MEMORY request, as granted
    memmap_allocs: list[int] = field(default_factory=list)  # memmap taken from RAM at add
    # virtio-mem (drivers/virtio/virtio_mem.c): `start`/`size` are the device region, the
    # hypervisor's requested size is what the driver plugs towards, block by block
    requested: int = 0
    block_memmap: dict[int, list[int]] = field(default_factory=dict)  # block id -> its memmap allocations
    wq_active: bool = False  # vm->wq_active: the driver's work item is running
