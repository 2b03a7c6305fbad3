"""Replay every x86 reference trace of every recorded kernel through the model and the
sysfs tables, dump by dump (tests/conformance/data; docs/conformance.md).

Every write's errno, every block attribute and link, the DMA/DMA32/Normal/Movable zone
counters, MemTotal, the parameters, the ACPI slots, the node links and the uevents must
match the real kernel exactly; MemFree moves are compared with the kernel's in
test_memfree_deltas_follow_the_kernel.

One condition is reproduced rather than emergent: where the trace shows an offline
refused with EBUSY because the kernel had put its own allocations into a freshly
onlined Normal block (memory32), the replayer pins an unmovable allocation into that
block just before the refused write (Replayer.pin_kernel_allocation).

The virtio-mem traces (f_virtio_mem) and the arm64 ones are replayed by their own tests
(test_replay_virtio_mem.py). The 6.12+ ACPI container `online` uevent after a hot-add is
compared here like every other uevent; node/nodeN/memory_failure/ is in the node links.
"""
from __future__ import annotations

import pytest

from .replayer import Replayer, replay
from .traces import load_trace

#: (kernel, scenario) of every x86 trace replayed here
TRACES = [("6.1", "a_memmap_on"), ("6.1", "b_memmap_off"), ("6.1", "g_memmap_force"),
          ("6.12", "a_memmap_on"), ("6.12", "b_memmap_off"), ("6.12", "g_memmap_force"),
          ("7.2", "a_memmap_on"), ("7.2", "b_memmap_off"), ("7.2", "g_memmap_force")]


#: differences the model cannot have: 7.2.13 booted with "memory_hotplug.memmap_on_memory=force"
#: reserved one page more than with "=1" (a longer command line, copied into memblock
#: allocations at boot); 6.1 and 6.12 reserved the same with both
KNOWN = {("7.2", "g_memmap_force"): [
    f"dump {n} ({label}): {d}" for n, label, total in (
        (1, "boot (memmap_on_memory=force)", 918004), (2, "memory32 online_movable", 1047028),
        (3, "memory33 online_movable (1G DIMM)", 1176052), (4, "memory32+33 offline", 918004))
    for d in ("zone DMA32 managed: kernel 225661, memfs 225662", f"MemTotal: kernel {total}, memfs {total + 4}")]}


@pytest.mark.parametrize("kernel, name", TRACES)
def test_trace_replays_exactly(kernel, name):
    trace = load_trace(name, kernel)
    r, problems, _ = replay(trace)
    assert problems == KNOWN.get((kernel, name), []), "\n".join(problems)
    # the EBUSY offlines (and the failed eject of DIMM1) needed exactly one pinned block
    assert r.pinned == ([] if name == "g_memmap_force" else ["memory32"])


# MemFree: every delta between two dumps, kernel against memfs. What memfs models (the
# boot numbers, memmaps from RAM through the per-cpu lists, the lists of a newly populated
# zone) brings most of them within 64 kB; the rest is the kernel's own activity between
# two dumps (slab, page cache, per-cpu list refills), which no sysfs state determines.
# docs/conformance.md "Known differences" lists the measured gaps.
WITHIN_64K_AT_LEAST = 96  # of 201 deltas; 62 before the per-cpu lists were modelled
#: residuals above 1 MiB, each a kernel event outside the model
OUTLIERS = {
    # MemFree rose ~7.3 MiB more than the offlined block accounts for; nothing else changed
    ("6.12", "b_memmap_off", 3), ("6.12", "g_memmap_force", 4),
    # the add took one memmap page, not a batch of two (the Normal zone's per-cpu list
    # presumably held one already), and the later Normal offline had nothing to drain
    ("6.12", "b_memmap_off", 23), ("6.12", "b_memmap_off", 27),
}


def test_memfree_deltas_follow_the_kernel():
    residuals: list[tuple[tuple[str, str, int], int]] = []
    for kernel, name in TRACES:
        _, _, free = replay(load_trace(name, kernel), check=False)
        for (prev, mine_prev), (dump, mine) in zip(free, free[1:]):
            residuals.append(((kernel, name, dump.step),
                              (mine - mine_prev) - (dump.mem_free - prev.mem_free)))
    assert len(residuals) == 201
    within = [key for key, r in residuals if abs(r) <= 64]
    assert len(within) >= WITHIN_64K_AT_LEAST, f"{len(within)} of {len(residuals)} MemFree deltas within 64 kB"
    big = {key: r for key, r in residuals if abs(r) > 1024}
    assert set(big) == OUTLIERS, big


@pytest.mark.parametrize("kernel", ["6.1", "6.12", "7.2"])
def test_boot_numbers_are_the_kernels(kernel):
    """MemTotal, MemFree and every zone's present/managed at boot, exactly."""
    for name in ("a_memmap_on", "b_memmap_off"):
        trace = load_trace(name, kernel)
        r = Replayer(trace)
        boot = trace.boot
        mi = r.machine.meminfo()
        assert mi["MemTotal"] == boot.mem_total
        for zname in ("DMA", "DMA32"):
            z = r.machine.nodes[0].zone(zname)
            assert (z.present, z.managed) == (boot.zones[zname]["present"], boot.zones[zname]["managed"])
        if name == "a_memmap_on":  # "used" was measured with every hot-plugged memmap on its block
            assert mi["MemFree"] == boot.mem_free
        else:  # ten 2 MiB memmaps from RAM; the kernel's own activity differs by a few hundred kB
            assert abs(mi["MemFree"] - boot.mem_free) <= 512
