"""Page allocations, so that offlining can fail the way it does on a busy kernel.

Unmovable allocations (kernel memory, memmaps taken from RAM) pin their block: offlining
it fails EBUSY. Movable ones migrate to free pages elsewhere when the block goes offline,
or make the offline fail EBUSY when there is no room. Placement is deterministic: the
node asked for first, then the others; zones in the buddy allocator's preference order
(highest allowed zone first, ZONE_MOVABLE only for movable); blocks lowest first.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator

from .blocks import MEM_ONLINE, MemoryBlock
from .zones import ZONE_DEVICE, ZONE_MOVABLE

if TYPE_CHECKING:
    from .hotplug import Machine

UNMOVABLE = "unmovable"
MOVABLE = "movable"


@dataclass
class Allocation:
    id: int
    kind: str
    nid: int | None
    pages: int
    label: str = ""
    pieces: dict[int, int] = field(default_factory=dict)  # block id -> pages

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

    def candidates(self, kind: str, nid: int | None, exclude: MemoryBlock | None = None) -> Iterator[MemoryBlock]:
        """Online single-zone blocks that may take pages of `kind`, in placement order."""
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
                    if b is not exclude and b.zone is zone and b.state == MEM_ONLINE and b.free > 0:
                        yield b

    def _plan(self, pages: int, blocks: Iterable[MemoryBlock]) -> list[tuple[MemoryBlock, int]] | None:
        plan, left = [], pages
        for b in blocks:
            take = min(b.free, left)
            if take > 0:
                plan.append((b, take))
                left -= take
            if left == 0:
                return plan
        return None if left else plan

    def _commit(self, a: Allocation, plan: list[tuple[MemoryBlock, int]]) -> None:
        for b, n in plan:
            self._charge(a, b, n)

    def _charge(self, a: Allocation, b: MemoryBlock, n: int) -> None:
        if a.kind == MOVABLE:
            b.movable += n
        else:
            b.unmovable += n
        b.allocs[a.id] = b.allocs.get(a.id, 0) + n
        a.pieces[b.id] = a.pieces.get(b.id, 0) + n
        assert b.zone is not None
        b.zone.used += n

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
        assert b.zone is not None
        b.zone.used -= n

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
            plan = [(block, pages)]
        else:
            plan = self._plan(pages, order if order is not None else self.candidates(kind, nid))
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
        target, room = next(targets)
        for a in movers:
            n = a.pieces[block.id]
            self._uncharge(a, block, n)
            while n:
                if room == 0:
                    target, room = next(targets)
                take = min(n, room)
                self._charge(a, target, take)
                n -= take
                room -= take
        return True
