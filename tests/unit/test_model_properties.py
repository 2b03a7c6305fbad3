"""Random hotplug sessions against the accounting invariants (hypothesis stateful testing).

Every step is a plug (acpi / probe / virtio_mem / dax_kmem, 1-4 blocks, node 0 or 1), a
virtio-mem resize, an online (every type, through `state` or `online`), an offline, an allocation (unmovable or
movable, placed or pinned to a block), a free, an unplug, a hwpoison, or a parameter change
(online_policy, auto_online_blocks), on kernel profiles 5.13 / 6.1 / 6.6 / 6.12 with
memmap_on_memory on, off or forced. After every step the counters are recomputed from
first principles (blocks, allocations, poisoned pfns) and compared with the model's.
"""
from __future__ import annotations

import tomllib

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from memfs.machine.config import from_dict
from memfs.machine.hotplug import Machine
from memfs.sysfs.tree import build_tree

MEM = "/sys/devices/system/memory"
PARAMS = "/sys/module/memory_hotplug/parameters"
MiB = 1 << 20

CONFIG = """
kernel = "{kernel}"
[hotplug]
base = "4G"
size = "8G"
slots = 16
[boot]
memmap_on_memory = {memmap}
[[node]]
id = 0
ram = ["0x1000-0x9f000", "0x100000-0x30000000"]
reserved = "48M"
used = "24M"
[[node]]
id = 1
ram = ["0x30000000-0x40000000"]
used = "8M"
"""


def make_machine(kernel: str, memmap) -> Machine:
    text = CONFIG.format(kernel=kernel, memmap='"force"' if memmap == "force" else str(memmap).lower())
    return Machine(from_dict(tomllib.loads(text)))


def zone_of_pfn(m: Machine, b, pfn: int):
    if b.zone is not None:
        return b.zone
    for zidx, (lo, hi, _) in b.boot_zone_pages.items():
        if lo <= pfn < hi:
            return m.nodes[b.nid].zones[zidx]
    raise AssertionError(f"pfn {pfn:#x} of {b.name} is in no zone")


def snapshot(m: Machine) -> tuple:
    """Everything a refused operation must leave alone."""
    zones = tuple((z.nid, z.name, z.start_pfn, z.spanned, z.present, z.present_early, z.managed, z.used,
                   z.vmemmap) for n in m.nodes.values() for z in n.zones)
    nodes = tuple((n.id, n.online, n.span(), tuple(n.blocks)) for n in m.nodes.values())
    blocks = tuple((b.id, b.state, b.dev_offline, b.zone.name if b.zone else None, b.unmovable, b.movable,
                    b.hwpoison, b.nr_vmemmap_pages, tuple(sorted(b.allocs.items())), tuple(sorted(b.zone_used.items())))
                   for b in m.blocks.values())
    allocs = tuple((a.id, a.kind, tuple(sorted(a.pieces.items())), tuple(sorted(a.zone_pieces.items())))
                   for a in m.allocator.allocs.values())
    groups = tuple((g.id, g.present_kernel_pages, g.present_movable_pages) for g in m.groups.values())
    devices = tuple((d.id, tuple(d.block_ids)) for d in m.devices.values())
    params = (m.auto_online_blocks, m.online_policy, m.auto_movable_ratio, m.auto_movable_numa_aware)
    return (zones, nodes, blocks, allocs, groups, devices, tuple(d and d.id for d in m.slots), params,
            m.events.seqnum, len(m.ost_log), tuple(sorted(m.poisoned)), m.nr_memmap_pages, m.meminfo())


class HotplugSession(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m: Machine | None = None
        self.n_refused = 0

    @initialize(kernel=st.sampled_from(["5.13", "6.1", "6.6", "6.12"]),
                memmap=st.sampled_from([True, False, "force"]))
    def boot(self, kernel, memmap):
        if memmap == "force" and kernel in ("5.13", "6.1"):
            memmap = True
        self.m = make_machine(kernel, memmap)
        self.tree = build_tree(self.m)
        self.last_seq = self.m.events.seqnum

    # ------------------------------------------------------------ helpers
    def attempt(self, fn, *args, may_change_on_error: bool = False, **kw):
        before = snapshot(self.m)
        try:
            return fn(*args, **kw)
        except OSError:
            self.n_refused += 1
            if not may_change_on_error:
                assert snapshot(self.m) == before, f"refused {getattr(fn, '__name__', fn)}{args} changed the model"
            return None

    def write(self, path: str, data: bytes):
        return self.attempt(self.tree.resolve(path).store, data)

    def pick_block(self, data) -> int:
        """Mostly hot-added blocks (where things happen), sometimes any block."""
        hot = sorted(b for b, mem in self.m.blocks.items() if not mem.boot)
        if hot and data.draw(st.integers(0, 4)):
            return data.draw(st.sampled_from(hot))
        return data.draw(st.sampled_from(sorted(self.m.blocks)))

    # ------------------------------------------------------------ rules
    @rule(driver=st.sampled_from(["acpi", "probe", "virtio_mem", "dax_kmem"]), nblocks=st.integers(1, 4),
          node=st.sampled_from([0, 1]), dax_memmap=st.booleans())
    def plug(self, driver, nblocks, node, dax_memmap):
        if driver == "probe":
            nblocks = 1
        kw = {"memmap_on_memory": dax_memmap} if driver == "dax_kmem" else {}
        # virtio-mem adds block by block: failing part-way it keeps what it plugged
        self.attempt(self.m.plug, nblocks * self.m.block_size, node=node, driver=driver,
                     may_change_on_error=driver == "virtio_mem", **kw)

    @precondition(lambda self: self.m is not None)
    @rule(data=st.data(), how=st.sampled_from([b"online", b"online_kernel", b"online_movable", b"online\n",
                                                b"1", b"y\n", b"on"]))
    def online(self, data, how):
        bid = self.pick_block(data)
        attr = "state" if how.startswith(b"online") else "online"
        self.write(f"{MEM}/memory{bid}/{attr}", how)

    @precondition(lambda self: self.m is not None)
    @rule(data=st.data(), via_state=st.booleans())
    def offline(self, data, via_state):
        bid = self.pick_block(data)
        if via_state:
            self.write(f"{MEM}/memory{bid}/state", b"offline\n")
        else:
            self.write(f"{MEM}/memory{bid}/online", b"0\n")

    @precondition(lambda self: self.m is not None)
    @rule(data=st.data(), kind=st.sampled_from(["unmovable", "movable"]), pinned=st.booleans(),
          mib=st.sampled_from([1, 8, 64, 200, 1024]), nid=st.sampled_from([None, 0, 1]))
    def alloc(self, data, kind, pinned, mib, nid):
        bid = self.pick_block(data) if pinned else None
        if pinned:
            mib = min(mib, 64)
        self.attempt(self.m.alloc, kind, mib * MiB, nid=nid, block_id=bid)

    @precondition(lambda self: self.m is not None and any(a.label == "user" for a in self.m.allocator.allocs.values()))
    @rule(data=st.data())
    def free(self, data):
        ids = sorted(a.id for a in self.m.allocator.allocs.values() if a.label == "user")
        self.attempt(self.m.free, data.draw(st.sampled_from(ids)))

    @precondition(lambda self: self.m is not None and self.m.devices)
    @rule(data=st.data())
    def unplug(self, data):
        dev_id = data.draw(st.sampled_from(sorted(self.m.devices)))
        blocks = list(self.m.devices[dev_id].block_ids)
        # a refused eject / offline_and_remove re-onlines what it offlined (events, zones)
        self.attempt(self.m.unplug, dev_id, may_change_on_error=True)
        if dev_id in self.m.devices:
            assert all(b in self.m.blocks for b in blocks)
        else:
            assert not any(b in self.m.blocks for b in blocks)

    @precondition(lambda self: self.m is not None and any(d.driver == "virtio_mem" for d in self.m.devices.values()))
    @rule(data=st.data(), nblocks=st.integers(0, 6))
    def resize(self, data, nblocks):
        """The hypervisor changes a virtio-mem device's requested size; a shrink that stops at
        a busy block (EBUSY) keeps what it removed, and the request."""
        dev = self.m.devices[data.draw(st.sampled_from(sorted(d.id for d in self.m.devices.values()
                                                               if d.driver == "virtio_mem")))]
        size = min(nblocks * self.m.block_size, dev.size)
        before = set(dev.block_ids)
        self.attempt(self.m.resize, dev.id, size, may_change_on_error=True)
        assert dev.requested == size
        plugged = self.m.virtio_mem_plugged_size(dev)
        if plugged > size:  # only a refused shrink leaves more than requested, never more than before
            assert set(dev.block_ids) <= before
        elif plugged < size:  # growing stops only at the offline threshold (or no RAM for a memmap)
            assert set(dev.block_ids) >= before

    @precondition(lambda self: self.m is not None)
    @rule(data=st.data(), soft=st.booleans(), page=st.integers(0, 32767))
    def poison(self, data, soft, page):
        bid = self.pick_block(data)
        addr = (bid * self.m.pages_per_block + page) * self.m.page_size
        name = "soft_offline_page" if soft else "hard_offline_page"
        self.write(f"{MEM}/{name}", f"{addr:#x}\n".encode())

    @precondition(lambda self: self.m is not None)
    @rule(policy=st.sampled_from([b"offline", b"online", b"online_kernel", b"online_movable", b"bogus"]))
    def set_auto_online(self, policy):
        self.write(f"{MEM}/auto_online_blocks", policy + b"\n")

    @precondition(lambda self: self.m is not None and self.m.profile.online_policy)
    @rule(policy=st.sampled_from([b"contig-zones", b"auto-movable", b"auto_movable"]),
          ratio=st.sampled_from([None, b"0", b"100", b"301", b"-5"]), numa=st.sampled_from([None, b"Y", b"N"]))
    def set_policy(self, policy, ratio, numa):
        self.write(f"{PARAMS}/online_policy", policy)
        if ratio is not None:
            self.write(f"{PARAMS}/auto_movable_ratio", ratio)
        if numa is not None:
            self.write(f"{PARAMS}/auto_movable_numa_aware", numa)

    # ------------------------------------------------------------ invariants
    def online_blocks(self):
        return [b for b in self.m.blocks.values() if b.state == "online"]

    @invariant()
    def zone_and_node_counters_add_up(self):
        m = self.m
        if m is None:
            return
        for node in m.nodes.values():
            for z in node.zones:
                present = vmemmap = reserved = 0
                lo, hi = None, None
                for b in self.online_blocks():
                    if b.nid != node.id:
                        continue
                    ext = b.extent_in(z)
                    if b.zone is z:
                        present += b.present_pages
                        vmemmap += b.nr_vmemmap_pages
                        reserved += b.reserved
                    elif b.zone is None and z.idx in b.boot_zone_pages:
                        present += b.boot_zone_pages[z.idx][2]
                        reserved += b.boot_reserved.get(z.idx, 0)
                    else:
                        continue
                    lo = ext[0] if lo is None else min(lo, ext[0])
                    hi = ext[1] if hi is None else max(hi, ext[1])
                assert z.present == present, (z.name, z.present, present)
                assert z.vmemmap == vmemmap, (z.name, z.vmemmap, vmemmap)
                assert z.reserved_boot == reserved, (z.name, z.reserved_boot, reserved)
                assert z.managed == z.present - z.vmemmap - z.reserved_boot, z.name
                # the span covers exactly the online pfns of the zone (holes allowed inside)
                if lo is None:
                    assert (z.start_pfn, z.spanned) == (0, 0), z.name
                else:
                    assert (z.start_pfn, z.end_pfn) == (lo, hi), (z.name, z.start_pfn, z.end_pfn, lo, hi)
            assert node.present == sum(z.present for z in node.zones)
            assert node.has_memory() == (node.present > 0)

    @invariant()
    def virtio_mem_blocks_lie_in_their_region(self):
        m = self.m
        if m is None:
            return
        for d in m.devices.values():
            assert d.block_ids == sorted(d.block_ids)
            for b in d.block_ids:
                assert m.blocks[b].device is d
                assert d.start <= b * m.block_size < d.start + d.size
            if d.driver == "virtio_mem":
                assert 0 <= d.requested <= d.size

    @invariant()
    def zone_used_is_allocations_plus_poison(self):
        m = self.m
        if m is None:
            return
        expect: dict[tuple[int, str], int] = {}
        for a in m.allocator.allocs.values():
            for bid, n in a.pieces.items():
                b = m.blocks[bid]
                assert b.state == "online", f"allocation {a.id} on offline {b.name}"
                if b.zone is not None:
                    expect[(b.nid, b.zone.name)] = expect.get((b.nid, b.zone.name), 0) + n
            for (bid, zidx), n in a.zone_pieces.items():
                b = m.blocks[bid]
                name = m.nodes[b.nid].zones[zidx].name
                expect[(b.nid, name)] = expect.get((b.nid, name), 0) + n
            assert sum(a.pieces.values()) == a.pages
        for pfn in m.poisoned:
            b = m.blocks.get(pfn // m.pages_per_block)
            assert b is not None, f"poisoned pfn {pfn:#x} outside any block"
            if b.state == "online":
                z = zone_of_pfn(m, b, pfn)
                expect[(b.nid, z.name)] = expect.get((b.nid, z.name), 0) + 1
        for node in m.nodes.values():
            for z in node.zones:
                assert z.used == expect.get((node.id, z.name), 0), (node.id, z.name, z.used, expect)
        assert sum(b.hwpoison for b in m.blocks.values()) == len(m.poisoned)
        assert m.meminfo()["HardwareCorrupted"] == 4 * len(m.poisoned)

    @invariant()
    def nothing_negative(self):
        m = self.m
        if m is None:
            return
        for node in m.nodes.values():
            for z in node.zones:
                for v in (z.start_pfn, z.spanned, z.present, z.present_early, z.managed, z.used, z.vmemmap):
                    assert v >= 0, (z.name, v)
                assert z.used <= z.managed, z.name
        for b in m.blocks.values():
            assert min(b.unmovable, b.movable, b.hwpoison, b.reserved) >= 0
            assert b.free >= 0, b.name
            assert all(v >= 0 for v in b.zone_used.values())
        for g in m.groups.values():
            assert g.present_kernel_pages >= 0 and g.present_movable_pages >= 0
        assert m.nr_memmap_pages >= 0
        mi = m.meminfo()
        assert mi["MemFree"] >= 0 and mi["MemUsed"] >= 0

    @invariant()
    def memtotal_is_managed_pages(self):
        m = self.m
        if m is None:
            return
        managed = sum(z.managed for n in m.nodes.values() for z in n.zones)
        assert m.meminfo()["MemTotal"] == managed * 4
        text = self.tree.resolve("/proc/meminfo").show().splitlines()[0]
        assert text == f"MemTotal:       {managed * 4:>8} kB"

    @invariant()
    def seqnums_strictly_increase(self):
        m = self.m
        if m is None:
            return
        new = m.events.since(self.last_seq)
        seqs = [e.seqnum for e in new]
        assert seqs == sorted(set(seqs)) and all(b - a == 1 for a, b in zip(seqs, seqs[1:]))
        if seqs:
            assert seqs[0] == self.last_seq + 1 and seqs[-1] == m.events.seqnum
        self.last_seq = m.events.seqnum

    @invariant()
    def blocks_devices_groups_consistent(self):
        m = self.m
        if m is None:
            return
        owned = [b for d in m.devices.values() for b in d.block_ids]
        assert len(owned) == len(set(owned))
        hot = {b.id for b in m.blocks.values() if not b.boot}
        assert hot == set(owned), "hot-added blocks without a device (or the reverse)"
        for b in m.blocks.values():
            assert (b.state == "online") == (not b.dev_offline)
            assert (b.zone is not None) or b.boot or b.state == "offline"
            assert b.id in m.nodes[b.nid].blocks
        for g in m.groups.values():
            members = [b for b in m.blocks.values() if b.group is g]
            assert g.present_movable_pages == sum(b.present_pages for b in members
                                                  if b.state == "online" and b.zone.is_movable)
            assert g.present_kernel_pages == sum(b.present_pages for b in members
                                                 if b.state == "online" and not b.zone.is_movable)
        memmap = sum(len(d.block_ids) for d in m.devices.values()) * m.sections_per_block * m.section_memmap_pages()
        assert m.nr_memmap_pages == memmap


HotplugSession.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestHotplugSession = HotplugSession.TestCase
