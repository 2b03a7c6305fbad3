"""The hotplug core: drivers/base/memory.c and mm/memory_hotplug.c, as a Python object.

One `Machine` holds nodes, zones, memory blocks, devices and allocations. Every public
operation takes `self.lock` (the device-hotplug lock), so writers are serialised; each
either completes or raises OSError with the kernel's errno and changes nothing.
Online, offline and valid_zones cost O(log n) in the number of blocks: zones keep
sorted member lists, blocks live in a dict keyed by block id.
"""
from __future__ import annotations

import bisect
import errno
import functools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from . import alloc as _alloc
from .alloc import Allocation, Allocator
from .blocks import (
    MEM_GOING_OFFLINE, MEM_OFFLINE, MEM_ONLINE, MMOP_OFFLINE, MMOP_ONLINE, MMOP_ONLINE_KERNEL,
    MMOP_ONLINE_MOVABLE, ONLINE_TYPE_NAMES, HotplugDevice, MemoryBlock, MemoryGroup,
)
from .config import ConfigError, MachineConfig, StateConfig, load_config
from .events import EventLog
from .lockdep import lockdep_assert_held
from .zones import ZONE_MOVABLE, ZONE_NORMAL, Node, Zone, arm64_zone_limits, make_zones

EHWPOISON = 133  # not in Python's errno module on every platform
#: QEMU's memory hotplug container (\_SB.MHPC, PNP0A06) as drivers/acpi/container.c registers it
ACPI_CONTAINER_DEVPATH = "/devices/system/container/PNP0A06:04"
#: nodeN/memory_failure/ files, in memory_failure_attr[] order
MF_STATS = ("total", "ignored", "failed", "delayed", "recovered")

# x86_64 4-level paging: MAX_PHYSMEM_BITS 46; arm64: 48 (52 with LPA, not modelled)
_MAX_PHYSMEM_BITS = {"x86_64": 46}


# The journal callback: (operation, args, kwargs, outcome). The outcome is None for
# success, the errno of an OSError (what the caller was answered), or any other
# exception escaping the operation (a model bug, which a replay must raise again).
Journal = Callable[[str, tuple, dict, "int | BaseException | None"], None]


def journaled(fn):
    """Record every user-visible operation (outermost call only) with its outcome.

    The model is deterministic, so replaying the journal on a fresh Machine built from
    the same description reproduces the state exactly (``Machine.replay``). The
    journal callback runs under the hotplug lock, before the caller is answered.
    """
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(self: "Machine", *args: Any, **kw: Any) -> Any:
        with self.lock:
            self._depth += 1
            outcome: int | BaseException | None = None
            try:
                return fn(self, *args, **kw)
            except OSError as e:
                outcome = e.errno
                raise
            except BaseException as e:
                outcome = e
                raise
            finally:
                self._depth -= 1
                if self._depth == 0 and self.journal is not None:
                    self.journal(name, args, kw, outcome)
    return wrapper


@dataclass
class AcpiOstReport:
    """An ACPI _OST report, as QEMU shows it in ACPI_DEVICE_OST events."""
    device: str
    source: int
    status: int


class Machine:
    def __init__(self, cfg: MachineConfig) -> None:
        self.cfg = cfg
        self.profile = cfg.profile
        self.arch = cfg.arch_profile
        self.page_size = self.arch.page_size
        self.page_shift = self.arch.page_shift
        self.block_size = int(cfg.block_size)
        self.pages_per_block = self.block_size >> self.page_shift
        self.pages_per_section = self.arch.section_size >> self.page_shift
        self.sections_per_block = self.block_size // self.arch.section_size
        self.lock = threading.RLock()
        self.journal: Journal | None = None  # set by persistence: called after each operation
        self._depth = 0
        self.events = EventLog()
        self.generation = 0  # bumped by every change: cheap staleness checks for viewers
        self.listeners: list[Callable[[], None]] = []  # called after every change, under self.lock
        self.nodes: dict[int, Node] = {}
        self.blocks: dict[int, MemoryBlock] = {}
        self.devices: dict[str, HotplugDevice] = {}
        self.slots: list[HotplugDevice | None] = [None] * cfg.slots
        self.groups: dict[int, MemoryGroup] = {}
        self._next_group = 0
        self.allocator = Allocator(self)
        self.ost_log: deque[AcpiOstReport] = deque(maxlen=10_000)  # recent ACPI _OST reports
        self.poisoned: set[int] = set()
        # module parameters and sysfs knobs
        b = cfg.boot
        self.memmap_on_memory: bool | str = b.memmap_on_memory if self.profile.memmap_on_memory else False
        self.auto_online_blocks = b.memhp_default_state
        self.online_policy = b.online_policy
        self.auto_movable_ratio = b.auto_movable_ratio
        self.auto_movable_numa_aware = b.auto_movable_numa_aware
        self.movable_node = b.movable_node
        # /proc/vmstat (6.11+)
        self.nr_memmap_pages = 0
        self.nr_memmap_boot_pages = 0
        # allocation ids of pages held on the zones' per-cpu lists (_populate_memmap, _fill_pcp)
        self.pcp_lists: list[int] = []
        self.booted = False
        # NODE_DATA(nid)->mf_stats (mm/memory-failure.c update_per_node_mf_stats(), 2023+):
        # the raw pages memory_failure() handled on each node, by outcome
        self.mf_stats: dict[int, dict[str, int]] = {
            n.id: dict.fromkeys(MF_STATS, 0) for n in cfg.nodes}
        self._boot()

    @classmethod
    def from_config(cls, path: str | None = None, **kw) -> "Machine":
        return cls(load_config(path, **kw))

    # ------------------------------------------------------------------ sizes
    def memory_block_memmap_size(self) -> int:
        """Bytes of struct pages describing one memory block."""
        return self.pages_per_block * self.cfg.struct_page_size

    def memory_block_memmap_on_memory_pages(self) -> int:
        pages = -(-self.memory_block_memmap_size() // self.page_size)
        if self.memmap_on_memory == "force":
            pb = self.arch.pageblock_pages
            pages = -(-pages // pb) * pb
        return pages

    def section_memmap_pages(self) -> int:
        return -(-self.pages_per_section * self.cfg.struct_page_size // self.page_size)

    # ------------------------------------------------------------------ boot
    def low_zones(self) -> tuple[tuple[str, int], ...]:
        """The zones below ZONE_NORMAL and their ends: fixed on x86_64 (16 MiB, 4 GiB);
        on arm64 from where boot memory starts and ends and the firmware's DMA limit."""
        if not self.cfg.arch.startswith("arm64"):
            return self.arch.low_zones
        mem = [r for n in self.cfg.nodes for r in n.ram + n.nomap]
        if not mem:
            return self.arch.low_zones
        dma, dma32 = arm64_zone_limits(min(s for s, _ in mem), max(e for _, e in mem), self.cfg.dma_limit,
                                       self.profile.arm64_zone_dma_limit)
        return (("DMA", dma), ("DMA32", dma32))

    def _boot(self) -> None:
        low_zones = self.low_zones()
        for n in self.cfg.nodes:
            node = Node(n.id, make_zones(n.id, low_zones, self.page_shift), cpus=n.cpus,
                        cpu_ids=tuple(n.cpu_ids))
            node.online = bool(n.ram) or n.cpus
            self.nodes[n.id] = node
        present_sections: set[int] = set()
        shift = self.page_shift
        for n in self.cfg.nodes:
            node = self.nodes[n.id]
            # memblock.memory: System RAM and the firmware's nomap regions alike
            for start, end in sorted(n.ram + n.nomap):
                self._boot_range(node, start >> shift, end >> shift, present_sections)
        for zone in self._all_zones():
            zone.members.sort()
        for blk in self.blocks.values():
            parts = blk.boot_zone_pages
            if len(parts) == 1:
                (zidx,) = parts
                blk.zone = self.nodes[blk.nid].zones[zidx]
        self.nr_memmap_boot_pages = len(present_sections) * self.section_memmap_pages()
        self.boot_sections = present_sections  # present_section_nr(): sections memblock has memory in
        self.boot_normal_nodes = {n.id for n in self.nodes.values() if n.has_normal_memory()}
        for n in self.cfg.nodes:
            for start, end in n.nomap:  # present, never managed, not System RAM
                self._reserve_range(start >> shift, end >> shift, nomap=True)
        for r in self.cfg.reserves:
            if r.kind == "cma":
                self._cma_range(r.start >> shift, r.end >> shift)
            elif r.kind == "used":
                continue  # allocated below, once zones know what they manage
            else:  # memblock_reserve(): the kernel image, initrd, firmware tables
                self._reserve_range(r.start >> shift, r.end >> shift)
        if self.cfg.arch == "x86_64":  # x86 keeps the first 1 MiB reserved (since 5.13)
            low_end = (1 << 20) >> self.page_shift
            for n in self.cfg.nodes:
                below = sum(max(0, min(e >> self.page_shift, low_end) - (s >> self.page_shift)) for s, e in n.ram)
                self._reserve(self.nodes[n.id], below, low=True)
        for n in self.cfg.nodes:
            self._reserve(self.nodes[n.id], n.reserved >> self.page_shift, low=False)
        for zone in self._all_zones():
            zone.managed = zone.present - zone.reserved_boot
        # Boot blocks that the description takes offline go first: memfs places the booted
        # kernel's `used` pages from the top of each node down, and a block that is offline
        # on the described machine holds none of them.
        early = [(i, st, [b for b in st.blocks if st.state == "offline" and b in self.blocks])
                 for i, st in enumerate(self.cfg.states)]
        for i, st, bids in early:
            self._apply_state(i, st, bids)
        # Boot blocks' `add` events went out before any listener existed (userspace
        # replays them by coldplug): they use up SEQNUMs but are not kept.
        self.events.seqnum += len(self.blocks)
        for r in self.cfg.reserves:
            if r.kind == "used":  # the kernel's own pages at a known place: unmovable
                for blk, _, n in list(self._overlaps(r.start >> shift, r.end >> shift)):
                    self.allocator.allocate(_alloc.UNMOVABLE, n, blk.nid, label="kernel", order=[blk])
        for n in self.cfg.nodes:
            pages = n.used >> self.page_shift
            if pages:
                order = [b for b in sorted(self.blocks.values(), key=lambda b: -b.id)
                         if b.nid == n.id and b.free > 0]
                self.allocator.allocate(_alloc.UNMOVABLE, pages, n.id, label="kernel", order=order)
        for d in self.cfg.dimms:
            self.plug(d.size, node=d.node, addr=d.addr, dev_id=d.id, driver=d.driver, slot=d.slot,
                      requested=d.requested if d.driver == "virtio_mem" else None)
        self.booted = True  # from here on, plugs are runtime hot-adds
        for (i, st, done) in early:
            self._apply_state(i, st, [b for b in st.blocks if b not in done])
        self.generation = 0

    def _apply_state(self, i: int, st: StateConfig, bids: list[int]) -> None:
        """One [[state]] entry: `st.state` written to each block's `state`, as state_store()
        would take it, unless the block is in that state (and zone) already."""
        with self.lock:  # as the writes to memoryN/state take it (lock_device_hotplug_sysfs)
            want = ONLINE_TYPE_NAMES.index(st.state)
            for bid in bids:
                mem = self.blocks.get(bid)
                if mem is None:
                    raise ConfigError(f"state[{i}].blocks: memory{bid} does not exist on this machine "
                                      f"(it has memory{min(self.blocks)} to memory{max(self.blocks)}, with holes)")
                try:
                    if want == MMOP_OFFLINE:
                        self.device_offline(mem)
                    else:
                        if mem.state == MEM_ONLINE and st.zone is not None and (mem.zone is None or mem.zone.name != st.zone):
                            self.device_offline(mem)  # auto-onlined into another zone: move it
                        if mem.state != MEM_ONLINE:
                            mem.online_type = want
                            self.device_online(mem)
                except OSError as e:
                    raise ConfigError(f"state[{i}]: writing {st.state} to memory{bid}/state fails "
                                      f"({errno.errorcode.get(e.errno, e.errno)}: {e.strerror or e}); "
                                      f"change the [[state]] entry or the machine") from None
                if st.zone is not None and (mem.zone is None or mem.zone.name != st.zone):
                    got = mem.zone.name if mem.zone is not None else "several zones"
                    raise ConfigError(f"state[{i}]: memory{bid} goes online in {got}, not {st.zone}")

    def _all_zones(self) -> Iterable[Zone]:
        for node in self.nodes.values():
            yield from node.zones

    def _boot_range(self, node: Node, spfn: int, epfn: int, sections: set[int]) -> None:
        """Account boot RAM [spfn, epfn): zones, blocks, node links (one pass per zone)."""
        ppb = self.pages_per_block
        zones = node.zones
        normal = node.zone(ZONE_NORMAL).idx
        pfn = spfn
        while pfn < epfn:
            zi = next((z.idx for z in zones if z.limit_pfn is not None and pfn < z.limit_pfn), normal)
            zone = zones[zi]
            seg_end = min(epfn, zone.limit_pfn) if zone.limit_pfn is not None else epfn
            if zone.is_empty():
                zone.start_pfn, zone.spanned = pfn, seg_end - pfn
            else:
                zone.resize_range(pfn, seg_end - pfn)
            zone.present += seg_end - pfn
            zone.present_early += seg_end - pfn
            sections.update(range(pfn // self.pages_per_section, (seg_end - 1) // self.pages_per_section + 1))
            blocks, members, links = self.blocks, zone.members, node.blocks
            for bid in range(pfn // ppb, (seg_end - 1) // ppb + 1):
                lo, hi = max(pfn, bid * ppb), min(seg_end, (bid + 1) * ppb)
                blk = blocks.get(bid)
                if blk is None:
                    blk = blocks[bid] = MemoryBlock(bid, bid * ppb, ppb, node.id, state=MEM_ONLINE,
                                                    dev_offline=False, boot=True, nids=(node.id,))
                elif node.id not in blk.nids:  # a boot block spanning two nodes: last nid wins
                    blk.nids += (node.id,)
                    blk.nid = node.id
                blk.present_pages += hi - lo
                part = blk.boot_zone_pages.get(zi)
                blk.boot_zone_pages[zi] = (lo, hi, hi - lo) if part is None else \
                    (min(part[0], lo), max(part[1], hi), part[2] + hi - lo)
                if not members or members[-1] != bid:
                    members.append(bid)
                links[bid] = None
            pfn = seg_end

    def _overlaps(self, spfn: int, epfn: int) -> Iterable[tuple[MemoryBlock, int, int]]:
        """(block, zone idx, pages) of boot memory in [spfn, epfn), per zone part of each block."""
        ppb = self.pages_per_block
        for bid in range(spfn // ppb, (epfn - 1) // ppb + 1):
            blk = self.blocks.get(bid)
            if blk is None:
                continue
            for zidx, (lo, hi, _) in blk.boot_zone_pages.items():
                n = min(hi, epfn) - max(lo, spfn)
                if n > 0:
                    yield blk, zidx, n

    def _reserve_range(self, spfn: int, epfn: int, nomap: bool = False) -> None:
        """memblock reservations at a fixed place (present, not managed, PageReserved)."""
        for blk, zidx, n in list(self._overlaps(spfn, epfn)):
            blk.boot_reserved[zidx] = blk.boot_reserved.get(zidx, 0) + n
            blk.reserved += n
            if nomap:
                blk.nomap += n
            self.nodes[blk.nid].zones[zidx].reserved_boot += n

    def _cma_range(self, spfn: int, epfn: int) -> None:
        """The CMA area (mm/cma.c): managed pages, counted in the zone's `cma`."""
        for blk, zidx, n in list(self._overlaps(spfn, epfn)):
            blk.cma += n
            self.nodes[blk.nid].zones[zidx].cma += n

    def _reserve(self, node: Node, pages: int, low: bool) -> None:
        """memblock reservations: `low` takes pages from pfn 0 up, else from the top down."""
        blocks = sorted((b for b in self.blocks.values() if b.nid == node.id), key=lambda b: b.id,
                        reverse=not low)
        for blk in blocks:
            if pages <= 0:
                break
            parts = sorted(blk.boot_zone_pages.items(), key=lambda kv: kv[1][0], reverse=not low)
            for zidx, (lo, hi, cnt) in parts:
                zone = node.zones[zidx]
                room = cnt - blk.boot_reserved.get(zidx, 0)
                take = min(room, pages)
                if take > 0:
                    blk.boot_reserved[zidx] = blk.boot_reserved.get(zidx, 0) + take
                    blk.reserved += take
                    zone.reserved_boot += take
                    pages -= take

    # ------------------------------------------------------------------ lookups
    def block(self, bid: int) -> MemoryBlock:
        blk = self.blocks.get(bid)
        if blk is None:
            raise OSError(errno.ENODEV, f"memory{bid} does not exist")
        return blk

    def block_ids(self) -> list[int]:
        return sorted(self.blocks)

    def _changed(self) -> None:
        self.generation += 1
        for listener in self.listeners:
            listener()

    # ------------------------------------------------------------------ zones
    def default_kernel_zone_for_pfn(self, nid: int, start_pfn: int, nr_pages: int) -> Zone:
        lockdep_assert_held(self.lock)
        node = self.nodes[nid]
        for zone in node.zones:
            if zone.name == ZONE_NORMAL:
                return zone
            if zone.intersects(start_pfn, nr_pages):
                return zone
        raise AssertionError("no ZONE_NORMAL")

    def default_zone_for_pfn(self, nid: int, start_pfn: int, nr_pages: int) -> Zone:
        lockdep_assert_held(self.lock)
        kernel_zone = self.default_kernel_zone_for_pfn(nid, start_pfn, nr_pages)
        movable_zone = self.nodes[nid].zone(ZONE_MOVABLE)
        in_kernel = kernel_zone.intersects(start_pfn, nr_pages)
        in_movable = movable_zone.intersects(start_pfn, nr_pages)
        if in_kernel ^ in_movable:
            return kernel_zone if in_kernel else movable_zone
        return movable_zone if self.movable_node else kernel_zone

    def auto_movable_can_online_movable(self, nid: int | None, group: MemoryGroup | None, nr_pages: int) -> bool:
        """mm/memory_hotplug.c auto_movable_can_online_movable() (5.15+, online_policy=auto-movable).

        Why: ZONE_MOVABLE can hold only movable pages, while every page, wherever it is,
        needs kernel memory (memmap, page tables, slab). Too much MOVABLE for the KERNEL
        memory behind it and the machine runs out of unmovable memory (OOM with plenty
        "free"). So onlining nr_pages to MOVABLE is allowed only while MOVABLE stays within
        ``auto_movable_ratio`` percent of the *early* kernel memory: boot memory, which cannot
        go away. Hot-added kernel memory does not count, since it may be unplugged again;
        except inside a dynamic memory group (a virtio-mem device), whose own kernel memory
        backs its own movable memory, because the two are plugged and unplugged together.
        ``nid`` None checks the whole machine, a node id that node alone.
        """
        lockdep_assert_held(self.lock)
        # auto_movable_stats_account_zone(): CMA pages (never on hot-added memory) behave
        # like ZONE_MOVABLE, so they move from the kernel side to the movable side.
        kernel_early = movable = 0
        nodes = self.nodes.values() if nid is None else [self.nodes[nid]]
        for node in nodes:
            for zone in node.zones:
                if not zone.populated():
                    continue
                if zone.is_movable:
                    movable += zone.present
                else:
                    kernel_early += zone.present_early - zone.cma
                    movable += zone.cma
        # auto_movable_stats_account_group() over the other dynamic groups: the early
        # kernel pages each group needs for its own movable pages (beyond the kernel pages
        # it has itself) are taken, and its movable pages are left out: they are paid for.
        ratio = self.auto_movable_ratio
        req_kernel = group_movable = 0
        for g in self.groups.values():  # walk_dynamic_memory_groups, skipping `group`
            if not g.is_dynamic or g is group or (nid is not None and g.nid != nid):
                continue
            pages = g.present_movable_pages * 100 // ratio - g.present_kernel_pages
            if pages > 0:
                req_kernel += pages
            group_movable += g.present_movable_pages
        if kernel_early <= req_kernel:
            return False
        kernel_early -= req_kernel
        movable -= group_movable
        # Kernel memory inside the group being onlined to allows more MOVABLE in that group.
        if group is not None and group.is_dynamic:
            kernel_early += group.present_kernel_pages
        # Could nr_pages go to ZONE_MOVABLE and the ratio still hold?
        movable += nr_pages
        return movable <= ratio * kernel_early // 100

    def auto_movable_zone_for_pfn(self, nid: int, group: MemoryGroup | None, pfn: int, nr_pages: int) -> Zone:
        lockdep_assert_held(self.lock)
        if not self.auto_movable_ratio:
            return self.default_kernel_zone_for_pfn(nid, pfn, nr_pages)
        online_pages = 0
        if group is not None and not group.is_dynamic:
            max_pages = group.max_pages
            online_pages = group.present_movable_pages
            if group.present_kernel_pages:
                return self.default_kernel_zone_for_pfn(nid, pfn, nr_pages)
        elif group is None or group.unit_pages == nr_pages:
            max_pages = nr_pages
        else:
            max_pages = group.unit_pages
            unit_start = pfn - pfn % group.unit_pages
            for bid in range(unit_start // self.pages_per_block,
                             (unit_start + group.unit_pages) // self.pages_per_block):
                b = self.blocks.get(bid)
                if b is None or b.state != MEM_ONLINE:
                    continue
                if not (b.zone and b.zone.is_movable):
                    return self.default_kernel_zone_for_pfn(nid, unit_start, nr_pages)
                online_pages += b.nr_pages
        remaining = max_pages - online_pages
        if not self.auto_movable_can_online_movable(None, group, remaining):
            return self.default_kernel_zone_for_pfn(nid, pfn, nr_pages)
        if self.auto_movable_numa_aware and not self.auto_movable_can_online_movable(nid, group, remaining):
            return self.default_kernel_zone_for_pfn(nid, pfn, nr_pages)
        return self.nodes[nid].zone(ZONE_MOVABLE)

    def zone_for_pfn_range(self, online_type: int, nid: int, group: MemoryGroup | None,
                           start_pfn: int, nr_pages: int) -> Zone:
        lockdep_assert_held(self.lock)
        if online_type == MMOP_ONLINE_KERNEL:
            return self.default_kernel_zone_for_pfn(nid, start_pfn, nr_pages)
        if online_type == MMOP_ONLINE_MOVABLE:
            return self.nodes[nid].zone(ZONE_MOVABLE)
        if self.profile.online_policy and self.online_policy == "auto-movable":
            return self.auto_movable_zone_for_pfn(nid, group, start_pfn, nr_pages)
        return self.default_zone_for_pfn(nid, start_pfn, nr_pages)

    def page_zone(self, mem: MemoryBlock, pfn: int) -> Zone:
        """page_zone() of a boot block's page, holes included: mm/page_alloc.c memmap_init()
        gives a hole's struct pages the zone of the range after it, and the hole from the
        end of RAM to the end of its section the node's highest populated zone."""
        zones = self.nodes[mem.nid].zones
        after = None
        for zidx, (lo, hi, _) in mem.boot_zone_pages.items():
            if lo <= pfn < hi:
                return zones[zidx]
            if lo > pfn and (after is None or lo < after[0]):
                after = (lo, zidx)
        if after is not None:
            return zones[after[1]]
        return max((z for z in zones if z.present), key=lambda z: z.idx)

    def test_pages_in_a_zone(self, mem: MemoryBlock) -> Zone | None:
        """mm/memory_hotplug.c test_pages_in_a_zone() (5.12-5.17): one page per
        MAX_ORDER_NR_PAGES of each present section; NULL once a page lies outside the
        zone's span or in another zone. So a block whose RAM ends inside it (the last
        block of a real 16 GiB laptop) gets "none" in valid_zones on these kernels."""
        lockdep_assert_held(self.lock)
        # MAX_ORDER_NR_PAGES: 1024 with 4K pages (MAX_ORDER 11); arm64 16K/64K: a pageblock
        step = 1024 if self.page_size == 4096 else self.arch.pageblock_pages
        zone: Zone | None = None
        pps = self.pages_per_section
        for sec in range(mem.start_pfn // pps, mem.end_pfn // pps):
            if sec not in self.boot_sections:
                continue
            for pfn in range(sec * pps, (sec + 1) * pps, step):
                if zone is not None and not zone.start_pfn <= pfn < zone.end_pfn:
                    return None
                z = self.page_zone(mem, pfn)
                if zone is not None and z is not zone:
                    return None
                zone = z
        return zone

    def valid_zones(self, mem: MemoryBlock) -> str:
        """valid_zones_show(), without the trailing newline.

        An online block shows its zone: from 5.18 the one stored per memory block
        (drivers/base/memory.c, 395f6081bad4 "determine and store zone for single-zone
        memory blocks": NULL only when the block spans zones); before, the zone that
        test_pages_in_a_zone() finds by scanning the block's pages."""
        lockdep_assert_held(self.lock)
        if mem.state == MEM_ONLINE:
            zone = mem.zone
            if not self.profile.cached_zone and mem.boot_zone_pages:
                zone = self.test_pages_in_a_zone(mem)
            if zone is None:
                return "none"
            return zone.name
        default = self.zone_for_pfn_range(MMOP_ONLINE, mem.nid, mem.group, mem.start_pfn, mem.nr_pages)
        names = [default.name]
        for t in (MMOP_ONLINE_KERNEL, MMOP_ONLINE_MOVABLE):
            z = self.zone_for_pfn_range(t, mem.nid, mem.group, mem.start_pfn, mem.nr_pages)
            if z is not default:
                names.append(z.name)
        return " ".join(names)

    def _shrink_zone_span(self, zone: Zone, start_pfn: int, end_pfn: int, bid: int) -> None:
        """shrink_zone_span(): only an edge moves, to the nearest online pfn of the zone."""
        lockdep_assert_held(self.lock)
        members = zone.members
        if zone.start_pfn == start_pfn:
            i = bisect.bisect_right(members, bid)
            ext = self.blocks[members[i]].extent_in(zone) if i < len(members) else None
            if ext:
                zone.spanned = zone.end_pfn - ext[0]
                zone.start_pfn = ext[0]
            else:
                zone.start_pfn = zone.spanned = 0
        elif zone.end_pfn == end_pfn:
            i = bisect.bisect_left(members, bid)
            ext = self.blocks[members[i - 1]].extent_in(zone) if i > 0 else None
            if ext:
                zone.spanned = ext[1] - zone.start_pfn
            else:
                zone.start_pfn = zone.spanned = 0

    # ------------------------------------------------------------------ online / offline
    def _adjust_present(self, mem: MemoryBlock, zone: Zone, pages: int) -> None:
        """adjust_present_page_count() (+ the present part of online_pages/offline_pages)."""
        lockdep_assert_held(self.lock)
        zone.present += pages
        if mem.boot:
            zone.present_early += pages
        g = mem.group
        if g is not None:
            if zone.is_movable:
                g.present_movable_pages += pages
            else:
                g.present_kernel_pages += pages

    def memory_block_online(self, mem: MemoryBlock) -> None:
        lockdep_assert_held(self.lock)
        if self.profile.hwpoison_online and mem.hwpoison:
            raise OSError(EHWPOISON, f"{mem.name} has hwpoisoned pages")
        zone = self.zone_for_pfn_range(mem.online_type, mem.nid, mem.group, mem.start_pfn, mem.nr_pages)
        newly_populated = not zone.populated()
        v = mem.nr_vmemmap_pages
        zone.resize_range(mem.start_pfn, mem.nr_pages)  # move_pfn_range_to_zone()
        self._adjust_present(mem, zone, mem.present_pages)
        zone.managed += mem.present_pages - v
        zone.vmemmap += v
        zone.used += mem.hwpoison
        mem.zone = zone
        mem.boot_zone_pages = {}
        zone.add_member(mem.id)
        if newly_populated:  # online_pages(): the zone's per-cpu lists fill
            self._fill_pcp(zone)

    def memory_block_offline(self, mem: MemoryBlock) -> None:
        """memory_block_offline() + offline_pages(), the checks in the kernel's order.

        5.18+ (cached_zone): a block without a zone (it spans several) fails first, in
        memory_block_offline(). offline_pages() then refuses a block with holes (fewer
        "System RAM" pages than it spans: "memory holes"), one in several zones
        ("multizone range"; before 5.18 test_pages_in_a_zone() found that here), isolates
        the range (PageReserved, unmovable and CMA pages: EBUSY "failure to isolate
        range"), asks the memory notifiers (arm64's prevent_bootmem_remove_notifier()
        answers NOTIFY_BAD for boot memory: EPERM "notifier failure"), then migrates.
        """
        lockdep_assert_held(self.lock)
        zone = mem.zone
        if zone is None and self.profile.cached_zone:
            raise OSError(errno.EINVAL, f"{mem.name} spans multiple zones")
        if mem.has_holes:
            raise OSError(errno.EINVAL, f"{mem.name}: failed due to memory holes")
        if zone is None:
            raise OSError(errno.EINVAL, f"{mem.name}: failed due to multizone range")
        # free pages sitting on the per-cpu lists are drained before isolation, not refused
        on_pcp = sum(mem.allocs.get(aid, 0) for aid in self.pcp_lists)
        if mem.reserved or mem.unmovable > on_pcp or mem.cma:
            raise OSError(errno.EBUSY, f"{mem.name}: unmovable pages, failed due to failure to isolate range")
        if mem.boot and self.cfg.arch.startswith("arm64"):
            raise OSError(errno.EPERM, f"Boot memory [{mem.start_pfn << self.page_shift:x} "
                                       f"{mem.end_pfn << self.page_shift:x}] offlining attempted: notifier failure")
        if self.cfg.offline_latency_ms:  # let `state` show going-offline, `online` readers wait
            time.sleep(self.cfg.offline_latency_ms / 1000)
        if not self.allocator.migrate_out(mem):
            raise OSError(errno.EBUSY, f"{mem.name}: no room to migrate {mem.movable} movable pages")
        # The kernel drains the zone's per-cpu lists at every offline attempt; the model does
        # it once the offline cannot fail any more, so that a refused write changes nothing
        # (a failed attempt's drain is refilled by the next allocations anyway).
        self._drain_pcp(zone, mem)
        v = mem.nr_vmemmap_pages
        start, end = mem.extent_in(zone) or (mem.start_pfn, mem.end_pfn)
        self._adjust_present(mem, zone, -mem.present_pages)
        zone.managed -= mem.present_pages - v
        zone.vmemmap -= v
        zone.used -= mem.hwpoison
        zone.remove_member(mem.id)
        self._shrink_zone_span(zone, start, end, mem.id)
        mem.zone = None
        mem.boot_zone_pages = {}

    def memory_block_change_state(self, mem: MemoryBlock, to_state: str, from_state: str) -> None:
        if mem.state != from_state:
            raise OSError(errno.EINVAL, f"{mem.name} is {mem.state}")
        if to_state == MEM_OFFLINE:
            mem.state = MEM_GOING_OFFLINE
        try:
            if to_state == MEM_ONLINE:
                self.memory_block_online(mem)
            else:
                self.memory_block_offline(mem)
        except BaseException:
            mem.state = from_state
            raise
        mem.state = to_state
        self._changed()

    def memory_subsys_online(self, mem: MemoryBlock) -> None:
        lockdep_assert_held(self.lock)
        if mem.state == MEM_ONLINE:
            return
        if mem.online_type == MMOP_OFFLINE:  # device_online() without a type: MMOP_ONLINE
            mem.online_type = MMOP_ONLINE
        try:
            self.memory_block_change_state(mem, MEM_ONLINE, MEM_OFFLINE)
        finally:
            mem.online_type = MMOP_OFFLINE

    def memory_subsys_offline(self, mem: MemoryBlock) -> None:
        lockdep_assert_held(self.lock)
        if mem.state == MEM_OFFLINE:
            return
        self.memory_block_change_state(mem, MEM_OFFLINE, MEM_ONLINE)

    def device_online(self, mem: MemoryBlock) -> int:
        """drivers/base/core.c device_online(): 1 if already online, 0 on success, raises on error."""
        lockdep_assert_held(self.lock)
        if not mem.dev_offline:
            return 1
        self.memory_subsys_online(mem)
        mem.dev_offline = False
        self.events.emit("online", mem.devpath)
        self._virtio_mem_notify_online(mem)
        return 0

    def device_offline(self, mem: MemoryBlock) -> int:
        lockdep_assert_held(self.lock)
        if mem.dev_offline:
            return 1
        self.memory_subsys_offline(mem)
        mem.dev_offline = True
        self.events.emit("offline", mem.devpath)
        return 0

    @journaled
    def state_store(self, bid: int, online_type: int) -> None:
        """memoryN/state after parsing: EINVAL when already in the requested state."""
        with self.lock:
            mem = self.block(bid)
            if online_type == MMOP_OFFLINE:
                ret = self.device_offline(mem)
            else:
                mem.online_type = online_type  # stays set if the block is already online
                ret = self.device_online(mem)
            if ret:
                raise OSError(errno.EINVAL, f"{mem.name} is already {ONLINE_TYPE_NAMES[online_type] if online_type else 'offline'}")

    @journaled
    def online_store(self, bid: int, value: bool) -> None:
        """memoryN/online after kstrtobool: success when already in the requested state."""
        with self.lock:
            mem = self.block(bid)
            (self.device_online if value else self.device_offline)(mem)

    # ------------------------------------------------------------------ parameters
    @journaled
    def set_auto_online_blocks(self, name: str) -> None:
        if name not in ONLINE_TYPE_NAMES:
            raise OSError(errno.EINVAL, f"auto_online_blocks: one of {', '.join(ONLINE_TYPE_NAMES)}")
        with self.lock:
            self.auto_online_blocks = name
            self._changed()

    @journaled
    def set_param(self, name: str, value: object) -> None:
        """online_policy, auto_movable_ratio, auto_movable_numa_aware (already parsed)."""
        with self.lock:
            if name not in ("online_policy", "auto_movable_ratio", "auto_movable_numa_aware"):
                raise OSError(errno.EACCES, f"parameter {name} is read-only")
            setattr(self, name, value)
            self._changed()

    # ------------------------------------------------------------------ add
    def mhp_supports_memmap_on_memory(self, size: int | None) -> bool:
        p, arch = self.profile, self.arch
        if not p.memmap_on_memory or not self.memmap_on_memory:
            return False
        vmemmap_size = self.memory_block_memmap_size()
        if not p.memmap_split_per_block and size != self.block_size:
            return False
        if not p.memmap_force:  # 5.13..6.5
            remaining = self.block_size - vmemmap_size
            return (vmemmap_size % arch.pmd_size == 0 and remaining > 0
                    and remaining % (arch.pageblock_pages * self.page_size) == 0)
        pages = self.memory_block_memmap_on_memory_pages()
        if vmemmap_size % self.page_size or pages % arch.pageblock_pages:
            return False
        if pages >= self.pages_per_block:  # "no effective hotplugged memory"
            return False
        return vmemmap_size % arch.pmd_size == 0  # arch_supports_memmap_on_memory()

    def _find_free_range(self, size: int) -> int:
        """QEMU's first fit in the device-memory window."""
        base = int(self.cfg.hotplug_base)
        end = base + self.cfg.hotplug_size
        addr = base
        for s, e in sorted((d.start, d.start + d.size) for d in self.devices.values()):
            if e <= addr:
                continue
            if s >= addr + size:
                break
            addr = max(addr, e)
        if addr + size > end:
            raise OSError(errno.ENOSPC, f"no free {size >> 20} MiB range in the hotplug window "
                                        f"{base:#x}-{end:#x}")
        return addr

    def _check_range(self, start: int, size: int, nid: int) -> None:
        if size <= 0 or start % self.block_size or size % self.block_size:
            raise OSError(errno.EINVAL, f"range {start:#x}+{size:#x} is not aligned to the block size {self.block_size:#x}")
        bits = _MAX_PHYSMEM_BITS.get(self.cfg.arch, 48)
        if start + size > 1 << bits:
            raise OSError(errno.E2BIG, f"range {start:#x}+{size:#x} is beyond the {bits}-bit physical address space")
        if nid not in self.nodes:
            raise OSError(errno.EINVAL, f"node {nid} is not possible")
        first, last = start // self.block_size, (start + size) // self.block_size
        for d in self.devices.values():
            if d.start < start + size and start < d.start + d.size:
                raise OSError(errno.EEXIST, f"range overlaps {d.id} at {d.start:#x}")
        if any(bid in self.blocks for bid in range(first, last)):  # boot RAM (no device) there
            raise OSError(errno.EEXIST, f"range {start:#x}+{size:#x} overlaps present memory")

    def add_memory(self, dev: HotplugDevice, request_memmap: bool, start: int | None = None,
                   size: int | None = None) -> None:
        """add_memory_resource(): blocks created offline, `add` events, node links, auto-online.

        [start, start + size) defaults to the whole device; virtio-mem adds one block of its
        region at a time (add_memory_driver_managed() per memory block)."""
        lockdep_assert_held(self.lock)
        start = dev.start if start is None else start
        size = dev.size if size is None else size
        if self.devices.get(dev.id) is not dev:  # a new device: its whole range must be free
            self._check_range(start, size, dev.nid)
        else:  # part of a registered device's region (virtio-mem): only present memory can be in the way
            first = start // self.block_size
            if any(b in self.blocks for b in range(first, first + size // self.block_size)):
                raise OSError(errno.EEXIST, f"range {start:#x}+{size:#x} overlaps present memory")
        nblocks = size // self.block_size
        use_altmap = False
        if request_memmap:
            if self.profile.memmap_split_per_block:
                use_altmap = self.mhp_supports_memmap_on_memory(None)
            elif self.profile.memmap_force:  # 6.6: silent fallback
                use_altmap = self.mhp_supports_memmap_on_memory(size)
            elif not self.mhp_supports_memmap_on_memory(size):
                raise OSError(errno.EINVAL, "memmap_on_memory requested but not supported for this range")
            else:
                use_altmap = True
        memmap_pages = nblocks * self.sections_per_block * self.section_memmap_pages()
        memmap_ids: list[int] = []
        if not use_altmap:  # the memmap comes from RAM, the new node's first
            memmap_ids = self._populate_memmap(memmap_pages, dev.nid, f"memmap:{dev.id}")
            dev.memmap_allocs += memmap_ids
        dev.memmap_on_memory = use_altmap
        node = self.nodes[dev.nid]
        node.online = True
        v = 0
        if use_altmap:
            v = (self.memory_block_memmap_on_memory_pages() if self.profile.memmap_force
                 else self.memory_block_memmap_size() // self.page_size)
        first = start // self.block_size
        new = []
        for i in range(nblocks):
            mem = MemoryBlock(first + i, (first + i) * self.pages_per_block, self.pages_per_block, dev.nid,
                              present_pages=self.pages_per_block, nr_vmemmap_pages=v, nids=(dev.nid,),
                              group=dev.group, device=dev)
            self.blocks[mem.id] = mem
            dev.block_ids.append(mem.id)
            if memmap_ids and nblocks == 1:
                dev.block_memmap[mem.id] = memmap_ids
            new.append(mem)
            self.events.emit("add", mem.devpath)
        if dev.block_ids[0] != first:  # a block within a region: keep the device's blocks in order
            dev.block_ids.sort()
        for mem in new:
            node.blocks[mem.id] = None
        self.nr_memmap_pages += memmap_pages
        self.devices[dev.id] = dev
        self._changed()
        if self.auto_online_blocks != "offline":
            for mem in new:
                self._auto_online(mem)

    def _auto_online(self, mem: MemoryBlock) -> None:
        lockdep_assert_held(self.lock)
        mem.online_type = ONLINE_TYPE_NAMES.index(self.auto_online_blocks)
        try:
            self.device_online(mem)
        except OSError:
            pass  # auto-online failures are ignored; the block stays offline

    def _new_group(self, nid: int, dynamic: bool, pages: int) -> MemoryGroup | None:
        lockdep_assert_held(self.lock)
        if not self.profile.online_policy:
            return None
        g = MemoryGroup(self._next_group, nid, dynamic, max_pages=0 if dynamic else pages,
                        unit_pages=pages if dynamic else 0)
        self._next_group += 1
        self.groups[g.id] = g
        return g

    @journaled
    def plug(self, size: int, node: int = 0, addr: int | None = None, dev_id: str | None = None,
             driver: str = "acpi", memmap_on_memory: bool = False, requested: int | None = None,
             slot: int | None = None) -> HotplugDevice:
        """Hot-add a device, like QEMU's device_add (acpi) or a driver binding.

        virtio-mem: `size` is the device region and `requested` the size the hypervisor asks
        for (default: the whole region); the driver then plugs blocks towards it. `slot`: the
        ACPI slot of a cold-plugged DIMM (the description's), else the first free one."""
        with self.lock:
            if dev_id is None:
                prefix = "dimm" if driver == "acpi" else driver  # QEMU-like: dimm1, dimm2, ...
                i = 1
                while f"{prefix}{i}" in self.devices:
                    i += 1
                dev_id = f"{prefix}{i}"
            if dev_id in self.devices:
                raise OSError(errno.EEXIST, f"a device called {dev_id!r} exists already")
            if size <= 0 or size % self.block_size:
                raise OSError(errno.EINVAL, f"size {size:#x} is not a multiple of the block size {self.block_size:#x}")
            if node not in self.nodes:
                raise OSError(errno.EINVAL, f"node {node} is not possible on this machine")
            if requested is not None and driver != "virtio_mem":
                raise OSError(errno.EINVAL, "a requested size is a virtio-mem property; other devices plug whole")
            if driver != "acpi":
                slot = None
            if driver == "acpi" and slot is not None:  # a cold-plugged DIMM in the description's slot
                if not 0 <= slot < len(self.slots) or self.slots[slot] is not None:
                    raise OSError(errno.EBUSY, f"DIMM slot {slot} is taken or does not exist")
            elif driver == "acpi":
                slot = next((i for i, d in enumerate(self.slots) if d is None), None)
                if slot is None:
                    raise OSError(errno.ENOSPC, f"all {len(self.slots)} DIMM slots are populated")
            start = addr if addr is not None else self._find_free_range(size)
            dev = HotplugDevice(dev_id, driver, start, size, node, slot=slot)
            if driver == "acpi" and not self.cfg.acpi_memory_hotplug:
                return self._acpi_dimm_without_driver(dev)
            pages = size >> self.page_shift
            if driver == "acpi":
                dev.group = self._new_group(node, False, pages)
                request = self.profile.memmap_on_memory and (
                    self.profile.acpi_always_requests or self.mhp_supports_memmap_on_memory(size))
            elif driver == "dax_kmem":
                if memmap_on_memory and not (self.profile.dax_kmem_memmap and self.mhp_supports_memmap_on_memory(None)):
                    raise OSError(errno.EOPNOTSUPP, "dax/kmem memmap_on_memory is not supported here")
                dev.group = self._new_group(node, False, pages)
                request = memmap_on_memory
            elif driver == "virtio_mem":
                return self._virtio_mem_probe(dev, size if requested is None else requested)
            elif driver == "probe":
                request = False
            else:
                raise OSError(errno.EINVAL, f"unknown driver {driver!r}")
            try:
                self.add_memory(dev, request)
            except OSError:
                if dev.group is not None:
                    del self.groups[dev.group.id]
                raise
            if slot is not None:
                self.slots[slot] = dev
                self.ost_log.append(AcpiOstReport(dev_id, 1, 0))
                if self.booted and self.profile.acpi_container_online:
                    # the Device Check rescan reaches the memory devices' container after
                    # the new blocks were added (and auto-onlined): KOBJ_ONLINE for it
                    self.events.emit("online", ACPI_CONTAINER_DEVPATH, subsystem="container")
            return dev

    def _acpi_dimm_without_driver(self, dev: HotplugDevice) -> HotplugDevice:
        """A DIMM on a kernel without CONFIG_ACPI_HOTPLUG_MEMORY (Debian's arm64 kernels).

        QEMU takes it (its slot shows status 15) and the ACPI core scans the new PNP0C80
        device and reports _OST success, but no driver binds it: no memory block, no
        memory. The arm64 reference trace shows exactly this for cold- and hot-plugged
        DIMMs; QMP device_del still ejects it (acpi_eject(), no blocks to offline)."""
        self._check_range(dev.start, dev.size, dev.nid)
        self.devices[dev.id] = dev
        assert dev.slot is not None
        self.slots[dev.slot] = dev
        self.ost_log.append(AcpiOstReport(dev.id, 1, 0))
        self._changed()
        return dev

    # ------------------------------------------------------------------ virtio-mem
    # drivers/virtio/virtio_mem.c in Sub Block Mode (SBM: the device block, 2 MiB with
    # QEMU, is smaller than a memory block). memfs plugs and unplugs whole memory blocks:
    # requested sizes are multiples of the memory block size, so no block is ever partly
    # plugged (VIRTIO_MEM_SBM_MB_*_PARTIAL never happens here).

    #: VIRTIO_MEM_DEFAULT_OFFLINE_THRESHOLD: the driver stops adding memory while this much
    #: of what it added is still offline (memory nobody onlines would only cost memmap)
    VIRTIO_MEM_OFFLINE_THRESHOLD = 1 << 30

    def _virtio_mem_probe(self, dev: HotplugDevice, requested: int) -> HotplugDevice:
        """virtio_mem_probe() + virtio_mem_init(): the region is reserved, the dynamic memory
        group registered (memory_group_register_dynamic(nid, unit_pages = one memory block in
        SBM)), then the work item processes the requested size."""
        self._check_range(dev.start, dev.size, dev.nid)
        self._check_requested(dev, requested)
        dev.requested = requested
        dev.group = self._new_group(dev.nid, True, self.pages_per_block)
        self.devices[dev.id] = dev
        self._changed()
        try:
            self.virtio_mem_run_wq(dev)
        except OSError:
            if not dev.block_ids:  # nothing plugged: the hot-add changed nothing
                del self.devices[dev.id]
                if dev.group is not None:
                    del self.groups[dev.group.id]
                self._changed()
            raise
        return dev

    def _check_requested(self, dev: HotplugDevice, requested: int) -> None:
        if not 0 <= requested <= dev.size:
            raise OSError(errno.EINVAL, f"requested size {requested:#x} is outside {dev.id}'s region "
                                        f"of {dev.size:#x} bytes")
        if requested % self.block_size:
            raise OSError(errno.EINVAL, f"requested size {requested:#x} is not a multiple of the memory "
                                        f"block size {self.block_size:#x} (memfs plugs whole blocks)")

    def virtio_mem_plugged_size(self, dev: HotplugDevice) -> int:
        """vm->plugged_size: every block the driver added is fully plugged."""
        return len(dev.block_ids) * self.block_size

    def _virtio_mem_offline_size(self, dev: HotplugDevice) -> int:
        """vm->offline_size: added by the driver and not (yet) online."""
        return sum(self.block_size for b in dev.block_ids if self.blocks[b].state != MEM_ONLINE)

    def _virtio_mem_offline_threshold(self) -> int:
        """virtio_mem_init(): at least two memory blocks may be offline at a time."""
        return max(2 * self.block_size, self.VIRTIO_MEM_OFFLINE_THRESHOLD)

    def _virtio_mem_could_add_memory(self, dev: HotplugDevice, size: int) -> bool:
        return self._virtio_mem_offline_size(dev) + size <= self._virtio_mem_offline_threshold()

    @journaled
    def resize(self, dev_id: str, requested: int) -> HotplugDevice:
        """The hypervisor changes a virtio-mem device's requested size (QEMU: qom-set DEV
        requested-size); the config-change interrupt runs the driver's work item at once.

        Growing that stops at the offline threshold is not an error: the driver goes on when
        blocks get onlined. A shrink that cannot free enough memory fails EBUSY after removing
        what it could; the request stays (the driver's retry timer is not modelled: resize
        again to retry)."""
        with self.lock:
            dev = self.device(dev_id)
            if dev.driver != "virtio_mem":
                raise OSError(errno.EOPNOTSUPP, f"{dev_id} is not a virtio-mem device (driver {dev.driver}); "
                                                f"only virtio-mem devices resize: unplug it, or plug another")
            self._check_requested(dev, requested)
            dev.requested = requested
            self._changed()
            self.virtio_mem_run_wq(dev)
            return dev

    def virtio_mem_run_wq(self, dev: HotplugDevice) -> None:
        """virtio_mem_run_wq(): plug or unplug the difference between requested and plugged."""
        lockdep_assert_held(self.lock)
        if dev.wq_active:  # virtio_mem_retry() while the work runs: this run sees the change
            return
        dev.wq_active = True
        try:
            plugged = self.virtio_mem_plugged_size(dev)
            if dev.requested > plugged:
                self._virtio_mem_sbm_plug_request(dev, dev.requested - plugged)
            elif dev.requested < plugged:
                self._virtio_mem_sbm_unplug_request(dev, plugged - dev.requested)
        finally:
            dev.wq_active = False

    def _virtio_mem_sbm_plug_request(self, dev: HotplugDevice, diff: int) -> None:
        """virtio_mem_sbm_plug_request(): reuse unused blocks, then prepare the next ones:
        bottom-up through the region. Each block is plugged, then added offline (or
        auto-onlined): add_memory_driver_managed(), never MHP_MEMMAP_ON_MEMORY."""
        nb = diff // self.block_size
        first = dev.start // self.block_size
        offline = self._virtio_mem_offline_size(dev)  # kept up to date here: O(region), not O(region^2)
        threshold = self._virtio_mem_offline_threshold()
        for bid in range(first, first + dev.size // self.block_size):
            if not nb:
                return
            if bid in self.blocks:
                continue
            if offline + self.block_size > threshold:  # virtio_mem_could_add_memory()
                return  # -ENOSPC: wait until blocks get onlined (MEM_ONLINE retries)
            self.add_memory(dev, False, start=bid * self.block_size, size=self.block_size)
            if self.blocks[bid].state != MEM_ONLINE:  # not auto-onlined
                offline += self.block_size
            nb -= 1

    def _virtio_mem_sbm_unplug_request(self, dev: HotplugDevice, diff: int) -> None:
        """virtio_mem_sbm_unplug_request(): offline blocks first, then ZONE_MOVABLE ones, then
        kernel-zone ones (5.16+; before, all online blocks alike), each from the highest block
        down. An online block is
        fake-offlined (alloc_contig_range(): its pages migrate away) and then goes through
        offline_and_remove_memory(); a block that cannot be freed (-EBUSY) stays, and the
        next candidate is tried. -EBUSY at the end if not enough could be unplugged."""
        nb = diff // self.block_size
        blocks = [self.blocks[b] for b in sorted(dev.block_ids, reverse=True)]
        offline = [m for m in blocks if m.state != MEM_ONLINE]
        online = [m for m in blocks if m.state == MEM_ONLINE]
        if self.profile.virtio_mem_movable_first:
            online = ([m for m in online if m.zone is not None and m.zone.is_movable]
                      + [m for m in online if not (m.zone is not None and m.zone.is_movable)])
        for mem in offline + online:
            if not nb:
                return
            if mem.state == MEM_ONLINE:
                try:
                    self.device_offline(mem)
                except OSError:
                    continue  # busy: keep the block, try the next one
            self._remove_blocks(dev, [mem])
            nb -= 1
        if nb:
            raise OSError(errno.EBUSY, f"{dev.id}: {nb * self.block_size >> 20} MiB of "
                                       f"{diff >> 20} MiB could not be unplugged: no other block can be "
                                       f"offlined; {dev.id} keeps {self.virtio_mem_plugged_size(dev) >> 20} MiB")

    def _virtio_mem_notify_online(self, mem: MemoryBlock) -> None:
        """virtio_mem_memory_notifier_cb(MEM_ONLINE): start adding more memory once half
        the offline threshold is free again, unless the work item is running already."""
        dev = mem.device
        if dev is None or dev.driver != "virtio_mem" or dev.wq_active or dev.id not in self.devices:
            return
        if dev.requested > self.virtio_mem_plugged_size(dev) and \
                self._virtio_mem_could_add_memory(dev, self._virtio_mem_offline_threshold() // 2):
            try:
                self.virtio_mem_run_wq(dev)
            except OSError:
                pass  # the work item's errors go to its retry timer, not to whoever onlined

    @journaled
    def probe_store(self, addr: int) -> None:
        """memory/probe: one block at `addr`, never with memmap_on_memory."""
        with self.lock:
            if addr % self.block_size:
                raise OSError(errno.EINVAL, f"{addr:#x} is not aligned to the block size")
            nid = self.memory_add_physaddr_to_nid(addr)
            self.plug(self.block_size, node=nid, addr=addr, dev_id=f"probe-{addr:#x}", driver="probe")

    def memory_add_physaddr_to_nid(self, addr: int) -> int:
        # x86 asks the SRAT; we take the node whose boot RAM starts highest below addr
        below = [(s, n.id) for n in self.cfg.nodes for s, _ in n.ram if s <= addr]
        return max(below)[1] if below else self.cfg.nodes[0].id

    # ------------------------------------------------------------------ memmap from RAM
    # x86-64 and arm64 map a hot-added section's memmap with one PMD-sized page, allocated
    # from the buddy allocator (vmemmap_populate_hugepages -> vmemmap_alloc_block, order 9:
    # 2 MiB for 128 MiB of 4 KiB pages). Since 5.13 pages of that order are kept on the
    # per-cpu lists (mm/page_alloc.c pcp_allowed_order), which NR_FREE_PAGES, and so MemFree,
    # does not count: an order-9 allocation refills the empty list with a batch of two
    # (nr_pcp_alloc: max(batch >> order, 2)) and keeps the second there; a freed memmap page
    # goes back onto the list of its zone, where the next memmap allocation finds it; the
    # list is drained when a block of that zone goes offline (offline_pages ->
    # zone_pcp_disable). The traces show exactly that: a first runtime add without
    # memmap_on_memory costs 4 MiB, removing it gives nothing back, adding the same range
    # again costs nothing, and offlining a Normal block afterwards frees 2 MiB.
    def _pcp_pageblock_pages(self) -> int:
        """Pages of one memmap page that the per-cpu lists cache (0: not modelled here)."""
        chunk = self.arch.pmd_size >> self.page_shift
        if self.profile.pcp_pageblock_order and self.section_memmap_pages() == chunk == self.arch.pageblock_pages:
            return chunk
        return 0

    def _alloc_zone(self, aid: int) -> Zone:
        """The zone of an allocation's first page."""
        a = self.allocator.allocs[aid]
        if a.zone_pieces:
            (bid, zidx), _ = min(a.zone_pieces.items())
            return self.nodes[self.blocks[bid].nid].zones[zidx]
        blk = self.blocks[min(a.pieces)]
        assert blk.zone is not None
        return blk.zone

    def _populate_memmap(self, pages: int, nid: int, label: str) -> list[int]:
        """The memmap of an added range, from RAM: allocation ids (ENOMEM: nothing taken)."""
        chunk = self._pcp_pageblock_pages()
        if not chunk:
            return [self.allocator.allocate(_alloc.UNMOVABLE, pages, nid, label=label).id]
        taken: list[int] = []
        reused: list[int] = []
        try:
            for _ in range(pages // chunk):
                first = next(self.allocator.candidates(_alloc.UNMOVABLE, nid), None)
                zone = first[1] if first is not None else None
                cached = [aid for aid in self.pcp_lists if self._alloc_zone(aid) is zone
                          and self.allocator.allocs[aid].pages == chunk]
                if cached:  # the preferred zone's per-cpu list has one
                    aid = cached[-1]
                    self.pcp_lists.remove(aid)
                    self.allocator.allocs[aid].label = label
                    reused.append(aid)
                    taken.append(aid)
                    continue
                taken.append(self.allocator.allocate(_alloc.UNMOVABLE, chunk, nid, label=label).id)
                try:  # the batch's second page stays on the list, if there is one to take
                    self.pcp_lists.append(self.allocator.allocate(_alloc.UNMOVABLE, chunk, nid, label=_alloc.PCP).id)
                except OSError:
                    pass
        except OSError:
            for aid in taken:
                if aid in reused:
                    self.allocator.allocs[aid].label = _alloc.PCP
                    self.pcp_lists.append(aid)
                else:
                    self.allocator.free(aid)
            raise
        return taken

    def _free_memmap(self, aid: int) -> None:
        """vmemmap_free(): a memmap page goes back to its zone's per-cpu list."""
        if self._pcp_pageblock_pages() and self.allocator.allocs[aid].pages == self._pcp_pageblock_pages():
            self.allocator.allocs[aid].label = _alloc.PCP
            self.pcp_lists.append(aid)
        else:
            self.allocator.free(aid)

    def _fill_pcp(self, zone: Zone) -> None:
        """A newly populated zone's per-cpu lists fill with its first allocations
        (rmqueue_bulk refills an empty list with a batch, up to pcp->high): free pages that
        leave NR_FREE_PAGES until an offline drains them. How many is emergent (what the
        kernel allocates right then); the profile holds the traces' median."""
        zone.pcp = min(self.profile.pcp_fill_pages, zone.free)

    def pcp_count(self, zone: Zone) -> int:
        """Pages on the zone's per-cpu lists (zoneinfo's pagesets count)."""
        return min(zone.pcp, zone.free) + sum(self.allocator.allocs[a].pages for a in self.pcp_lists
                                               if self._alloc_zone(a) is zone)

    def _drain_pcp(self, zone: Zone, mem: MemoryBlock | None = None) -> None:
        """zone_pcp_disable() at offline: the zone's per-cpu pages go back to the buddy allocator.

        ``mem``, the block going offline: a per-cpu batch the model placed across blocks of
        two zones counts as the first one's, but its pages in ``mem`` are in ``zone`` (in
        the kernel a page is on its own zone's lists), so it is drained too."""
        zone.pcp = 0
        for aid in [a for a in self.pcp_lists if self._alloc_zone(a) is zone
                    or (mem is not None and mem.id in self.allocator.allocs[a].pieces)]:
            self.pcp_lists.remove(aid)
            self.allocator.free(aid)

    # ------------------------------------------------------------------ remove
    def remove_memory(self, dev: HotplugDevice) -> None:
        """try_remove_memory(): every block must be offline; then blocks and memmap go."""
        lockdep_assert_held(self.lock)
        blocks = [self.blocks[b] for b in dev.block_ids]
        for mem in blocks:
            if mem.state != MEM_OFFLINE:
                raise OSError(errno.EBUSY, f"removing memory fails, because {mem.name} is online")
        with_altmap = [m for m in blocks if m.nr_vmemmap_pages]
        if with_altmap:
            if self.profile.memmap_split_per_block:
                if len(with_altmap) != len(blocks):
                    raise OSError(errno.EINVAL, "mixed altmap and non-altmap blocks in one range")
            elif len(blocks) != 1:
                raise OSError(errno.EINVAL, "Refuse to remove: wrong granularity")
        self._remove_blocks(dev, blocks)
        del self.devices[dev.id]
        if dev.slot is not None:
            self.slots[dev.slot] = None
        if dev.group is not None:
            self.groups.pop(dev.group.id, None)
        self._changed()

    def _remove_blocks(self, dev: HotplugDevice, blocks: list[MemoryBlock]) -> None:
        """arch_remove_memory() of offline blocks: their devices, node links and memmap go."""
        lockdep_assert_held(self.lock)
        node = self.nodes[dev.nid]
        for mem in blocks:
            if mem.hwpoison:  # the memmap goes, and its PG_hwpoison pages leave num_poisoned_pages
                self.poisoned -= {p for p in self.poisoned if mem.start_pfn <= p < mem.end_pfn}
            node.blocks.pop(mem.id, None)
            mem.removed = True
            del self.blocks[mem.id]
            self.events.emit("remove", mem.devpath)
            # added on its own (virtio-mem): its memmap goes with it
            for aid in dev.block_memmap.pop(mem.id, ()):
                self._free_memmap(aid)
                dev.memmap_allocs.remove(aid)
        gone = {mem.id for mem in blocks}
        dev.block_ids = [b for b in dev.block_ids if b not in gone]
        if not dev.block_ids:
            for aid in dev.memmap_allocs:
                self._free_memmap(aid)
            dev.memmap_allocs.clear()
        self.nr_memmap_pages -= len(blocks) * self.sections_per_block * self.section_memmap_pages()
        if not node.blocks and not node.cpus and not node.has_memory():
            node.online = False
        self._changed()

    @journaled
    def acpi_eject(self, dev_id: str, source: int = 0x103) -> None:
        """acpi_scan_hot_remove(): offline every block (two passes) or re-online and fail EBUSY."""
        with self.lock:
            dev = self.device(dev_id)
            if dev.slot is None:
                raise OSError(errno.ENODEV, f"{dev_id} is not an ACPI memory device")
            self.ost_log.append(AcpiOstReport(dev_id, source, 0x84))
            blocks = [self.blocks[b] for b in dev.block_ids]
            offlined: list[MemoryBlock] = []
            failed: MemoryBlock | None = None
            for second_pass in (False, True):
                failed = None
                for mem in blocks:
                    try:
                        if self.device_offline(mem) == 0:
                            offlined.append(mem)
                    except OSError:
                        failed = mem
                        if second_pass:
                            break
                if failed is None:
                    break
            if failed is not None:
                for mem in offlined:
                    self.device_online(mem)  # acpi_bus_online(): MMOP_ONLINE, the default zone
                self.ost_log.append(AcpiOstReport(dev_id, source, 0x82))
                raise OSError(errno.EBUSY, f"{failed.name}: Offline failed.")
            self.remove_memory(dev)
            self.ost_log.append(AcpiOstReport(dev_id, source, 0))

    @journaled
    def offline_and_remove_memory(self, dev_id: str) -> None:
        """mm's offline_and_remove_memory(): offline all, or re-online with the old zone type."""
        with self.lock:
            dev = self.device(dev_id)
            blocks = [self.blocks[b] for b in dev.block_ids]
            types = {m.id: (MMOP_OFFLINE if m.state == MEM_OFFLINE else
                            MMOP_ONLINE_MOVABLE if m.zone and m.zone.is_movable else MMOP_ONLINE_KERNEL)
                     for m in blocks}
            try:
                for mem in blocks:
                    self.device_offline(mem)
                self.remove_memory(dev)
            except OSError:
                for mem in blocks:
                    if types[mem.id] != MMOP_OFFLINE and mem.state == MEM_OFFLINE:
                        mem.online_type = types[mem.id]
                        try:
                            self.device_online(mem)
                        except OSError:
                            pass
                raise

    @journaled
    def unplug(self, dev_id: str) -> None:
        """Remove a device the way its driver would: ACPI eject, else offline_and_remove_memory."""
        with self.lock:
            dev = self.device(dev_id)
            if dev.driver == "acpi":
                self.acpi_eject(dev_id, source=3)
            else:
                self.offline_and_remove_memory(dev_id)

    def device(self, dev_id: str) -> HotplugDevice:
        dev = self.devices.get(dev_id)
        if dev is None:
            raise OSError(errno.ENOENT, f"no device {dev_id!r}; see `memfs status` for the devices")
        return dev

    @journaled
    def synth_uevent(self, bid: int | None, action: str, extra: tuple[tuple[str, str], ...]) -> None:
        """A write to memoryN/uevent: the event goes out, nothing else changes."""
        if bid is None:
            return  # the root memory device's events are filtered
        mem = self.block(bid)
        self.events.emit(action, mem.devpath, extra=tuple(tuple(kv) for kv in extra))

    def replay(self, entries: Iterable[tuple[str, list, dict, "int | None"]]) -> int:
        """Re-run journaled operations; returns how many gave a different outcome."""
        mismatches = 0
        for name, args, kw, err in entries:
            fn = getattr(self, name, None)
            if fn is None or getattr(fn, "__wrapped__", None) is None:
                raise ValueError(f"journal names an unknown operation {name!r}")
            got: int | None = None
            try:
                fn(*args, **kw)
            except OSError as e:
                got = e.errno
            mismatches += got != err
        return mismatches

    # ------------------------------------------------------------------ allocations, poison
    @journaled
    def alloc(self, kind: str, size: int, nid: int | None = None, block_id: int | None = None) -> Allocation:
        with self.lock:
            pages = -(-size // self.page_size)
            blk = self.block(block_id) if block_id is not None else None
            a = self.allocator.allocate(kind, pages, nid, blk, label="user")
            self._changed()
            return a

    @journaled
    def free(self, alloc_id: int) -> None:
        with self.lock:
            self.allocator.free(alloc_id)
            self._changed()

    @journaled
    def memory_failure(self, addr: int, soft: bool) -> None:
        """soft_offline_page / hard_offline_page: poison the page at physical address `addr`."""
        with self.lock:
            pfn = addr >> self.page_shift
            mem = self.blocks.get(pfn // self.pages_per_block)
            if mem is None or (mem.boot and not any(lo <= pfn < hi for lo, hi, _ in mem.boot_zone_pages.values())
                               and mem.boot_zone_pages):
                raise OSError(errno.ENXIO, f"pfn {pfn:#x} is not valid")
            if mem.state != MEM_ONLINE:
                raise OSError(errno.EIO if soft else errno.ENXIO, f"pfn {pfn:#x} is not online")
            if pfn in self.poisoned:
                return
            zone = mem.zone
            if zone is None:  # a boot block spanning zones (memory0): the zone of this pfn
                zidx = next(i for i, (lo, hi, _) in mem.boot_zone_pages.items() if lo <= pfn < hi)
                zone = self.nodes[mem.nid].zones[zidx]
            if self.allocator.room(mem, zone) <= 0:
                raise OSError(errno.EBUSY, f"pfn {pfn:#x} is in use and cannot be isolated")
            self.poisoned.add(pfn)
            mem.hwpoison += 1
            if mem.zone is None:
                mem.zone_used[zone.idx] = mem.zone_used.get(zone.idx, 0) + 1
            zone.used += 1
            if not soft:  # a free page taken off the buddy: action_result(MF_MSG_BUDDY, MF_RECOVERED);
                # soft_offline_page() never calls action_result(), so it counts nowhere
                stats = self.mf_stats[zone.nid]
                stats["total"] += 1
                stats["recovered"] += 1
            self._changed()

    # ------------------------------------------------------------------ accounting views
    def node_distance(self, a: int, b: int) -> int:
        """__node_distance(): the description's SLIT row, else LOCAL_DISTANCE/REMOTE_DISTANCE."""
        row = next(n.distance for n in self.cfg.nodes if n.id == a)
        if row:
            return row[sorted(self.nodes).index(b)]
        return 10 if a == b else 20

    def nr_cpu_ids(self) -> int:
        return max((c for n in self.nodes.values() for c in n.cpu_ids), default=0) + 1

    def normal_memory_nodes(self) -> list[int]:
        """N_NORMAL_MEMORY: up to 6.16 hotplug keeps it in step with the kernel zones."""
        if self.profile.toggles_normal_memory:
            return [n for n, node in self.nodes.items() if node.has_normal_memory()]
        return sorted(self.boot_normal_nodes)

    def meminfo(self, nid: int | None = None) -> dict[str, int]:
        """MemTotal/MemFree/MemUsed in kB, system-wide or for one node."""
        nodes = self.nodes.values() if nid is None else [self.nodes[nid]]
        kb = self.page_size // 1024
        total = sum(n.managed for n in nodes) * kb
        free = sum(n.nr_free_pages for n in nodes) * kb
        return {"MemTotal": total, "MemFree": free, "MemUsed": total - free,
                "HardwareCorrupted": len(self.poisoned) * kb}
