"""Page allocations, so that offlining can fail the way it does on a busy kernel.

Unmovable allocations (kernel memory, memmaps taken from RAM) pin their block: offlining
it fails EBUSY. Movable ones migrate to free pages elsewhere when the block goes offline,
or make the offline fail EBUSY when there is no room. Placement is deterministic: the
node asked for first, then the others; zones in the buddy allocator's preference order
(highest allowed zone first, ZONE_MOVABLE only for movable); blocks lowest first.
A boot block that spans two zones (x86 memory0: DMA + DMA32) lends its free pages to each
zone it is in, like the buddy allocator does; it can never be offlined, so those pages
only ever leave it by being freed.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator

from .blocks import MEM_ONLINE, MemoryBlock
from .zones import ZONE_DEVICE, ZONE_MOVABLE, Zone

if TYPE_CHECKING:
    from .hotplug import Machine

UNMOVABLE = "unmovable"
MOVABLE = "movable"
#: label of freed memmap pages held on a zone's per-cpu lists (Machine.pcp_lists): not in
#: NR_FREE_PAGES, reused by the next memmap allocation, drained by an offline in the zone
PCP = "pcp"


@dataclass
class Allocation:
    id: int
    kind: str
    nid: int | None
    pages: int
    label: str = ""
    pieces: dict[int, int] = field(default_factory=dict)  # block id -> pages
    # pages in blocks that span zones: (block id, zone idx) -> pages
    zone_pieces: dict[tuple[int, int], int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "node": self.nid, "pages": self.pages,
                "label": self.label, "blocks": {str(b): n for b, n in sorted(self.pieces.items())}}


class Allocator:
    def __init__(self, machine: "Machine") -> None:
        self.m = machine
        self.allocs: dict[int, Allocation] = {}
        self.next_id = 1

    def zone_names(self, kind: str) -> list[str]:
        kernel = [z.name for z in reversed(self.m.nodes[min(self.m.nodes)].zones)
                  if z.name not in (ZONE_MOVABLE, ZONE_DEVICE)]
        return [ZONE_MOVABLE, *kernel] if kind == MOVABLE else kernel

    @staticmethod
    def room(b: MemoryBlock, zone: Zone) -> int:
        """Free pages of `b` that belong to `zone` (0 if none or the block is not online)."""
        if b.state != MEM_ONLINE:
            return 0
        if b.zone is zone:
            return b.free
        if b.zone is None and zone.idx in b.boot_zone_pages:  # spans zones (memory0)
            cnt = b.boot_zone_pages[zone.idx][2]
            return min(b.free, cnt - b.boot_reserved.get(zone.idx, 0) - b.zone_used.get(zone.idx, 0))
        return 0

    def _parts(self, b: MemoryBlock) -> list[tuple[MemoryBlock, Zone]]:
        """(block, zone) for each zone `b` has pages in, highest zone first."""
        if b.zone is not None:
            return [(b, b.zone)]
        zones = self.m.nodes[b.nid].zones
        return [(b, zones[i]) for i in sorted(b.boot_zone_pages, reverse=True)]

    def candidates(self, kind: str, nid: int | None,
                   exclude: MemoryBlock | None = None) -> Iterator[tuple[MemoryBlock, Zone]]:
        """(block, zone) with free pages that may take pages of `kind`, in placement order."""
        nids = sorted(self.m.nodes)
        if nid is not None and nid in self.m.nodes:
            nids.remove(nid)
            nids.insert(0, nid)
        names = self.zone_names(kind)
        for n in nids:
            node = self.m.nodes[n]
            for name in names:
                zone = node.zone(name)
                for bid in zone.members:
                    b = self.m.blocks[bid]
                    if b is not exclude and self.room(b, zone) > 0:
                        yield b, zone

    def _plan(self, pages: int, cands: Iterable[tuple[MemoryBlock, Zone]]
              ) -> list[tuple[MemoryBlock, Zone, int]] | None:
        plan, left = [], pages
        for b, zone in cands:
            take = min(self.room(b, zone), left)
            if take > 0:
                plan.append((b, zone, take))
                left -= take
            if left == 0:
                return plan
        return None if left else plan

    def _commit(self, a: Allocation, plan: list[tuple[MemoryBlock, Zone, int]]) -> None:
        for b, zone, n in plan:
            self._charge(a, b, n, zone)

    def _charge(self, a: Allocation, b: MemoryBlock, n: int, zone: Zone | None = None) -> None:
        if a.kind == MOVABLE:
            b.movable += n
        else:
            b.unmovable += n
        b.allocs[a.id] = b.allocs.get(a.id, 0) + n
        a.pieces[b.id] = a.pieces.get(b.id, 0) + n
        if b.zone is None:  # a block spanning zones: remember which part
            assert zone is not None
            b.zone_used[zone.idx] = b.zone_used.get(zone.idx, 0) + n
            key = (b.id, zone.idx)
            a.zone_pieces[key] = a.zone_pieces.get(key, 0) + n
        else:
            zone = b.zone
        zone.used += n

    def _uncharge(self, a: Allocation, b: MemoryBlock, n: int) -> None:
        if a.kind == MOVABLE:
            b.movable -= n
        else:
            b.unmovable -= n
        left = b.allocs[a.id] - n
        if left:
            b.allocs[a.id] = left
        else:
            del b.allocs[a.id]
        left = a.pieces[b.id] - n
        if left:
            a.pieces[b.id] = left
        else:
            del a.pieces[b.id]
        if b.zone is not None:
            b.zone.used -= n
            return
        node = self.m.nodes[b.nid]
        for key in [k for k in a.zone_pieces if k[0] == b.id]:
            take = min(n, a.zone_pieces[key])
            a.zone_pieces[key] -= take
            if not a.zone_pieces[key]:
                del a.zone_pieces[key]
            b.zone_used[key[1]] -= take
            node.zones[key[1]].used -= take
            n -= take
        assert n == 0

    def allocate(self, kind: str, pages: int, nid: int | None = None, block: MemoryBlock | None = None,
                 label: str = "", order: Iterable[MemoryBlock] | None = None) -> Allocation:
        """Place `pages` pages or raise (ENOMEM, EINVAL), changing nothing on failure."""
        if kind not in (UNMOVABLE, MOVABLE):
            raise OSError(errno.EINVAL, f"allocation kind must be {UNMOVABLE} or {MOVABLE}")
        if pages <= 0:
            raise OSError(errno.EINVAL, "allocation size must be at least one page")
        if block is not None:
            if block.state != MEM_ONLINE or block.zone is None:
                raise OSError(errno.EINVAL, f"{block.name} is not online in a single zone")
            if kind == UNMOVABLE and block.zone.is_movable:
                raise OSError(errno.EINVAL, f"{block.name} is in ZONE_MOVABLE, which takes movable allocations only")
            if block.free < pages:
                raise OSError(errno.ENOMEM, f"{block.name} has {block.free} free pages, {pages} asked")
            plan = [(block, block.zone, pages)]
        else:
            cands = (c for b in order for c in self._parts(b)) if order is not None else self.candidates(kind, nid)
            plan = self._plan(pages, cands)
            if plan is None:
                raise OSError(errno.ENOMEM, f"no room for {pages} {kind} pages")
        a = Allocation(self.next_id, kind, nid, pages, label)
        self.next_id += 1
        self._commit(a, plan)
        self.allocs[a.id] = a
        return a

    def free(self, alloc_id: int) -> Allocation:
        a = self.allocs.pop(alloc_id, None)
        if a is None:
            raise OSError(errno.ENOENT, f"no allocation {alloc_id}")
        for bid, n in list(a.pieces.items()):
            self._uncharge(a, self.m.blocks[bid], n)
        return a

    def migrate_out(self, block: MemoryBlock) -> bool:
        """Move every movable page off `block` (do_migrate_range); False if no room, nothing moved."""
        if not block.movable:
            return True
        movers = [self.allocs[aid] for aid in list(block.allocs) if self.allocs[aid].kind == MOVABLE]
        plan = self._plan(block.movable, self.candidates(MOVABLE, block.nid, exclude=block))
        if plan is None:
            return False
        # Hand each allocation's pages on this block to the planned targets, in order.
        targets = iter(plan)
        target, tzone, room = next(targets)
        for a in movers:
            n = a.pieces[block.id]
            self._uncharge(a, block, n)
            while n:
                if room == 0:
                    target, tzone, room = next(targets)
                take = min(n, room)
                self._charge(a, target, take, tzone)
                n -= take
                room -= take
        return True
