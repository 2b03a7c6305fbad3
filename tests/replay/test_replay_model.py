"""Replay both reference traces through the model and the sysfs tables, dump by dump.

Every write's errno, every block attribute and link, the DMA/DMA32/Normal/Movable
zone counters, MemTotal, the parameters, the ACPI slots, the node links and the
uevents must match the real Debian 6.1 kernel exactly.

One condition is reproduced rather than emergent: where the trace shows an offline
refused with EBUSY because the kernel had put its own allocations into a freshly
onlined Normal block (memory32), the replayer pins an unmovable allocation into that
block just before the refused write (Replayer.pin_kernel_allocation).
"""
import pytest

from .replayer import Replayer
from .traces import TRACE_A, TRACE_B, Dump, load_trace


@pytest.mark.parametrize("name", [TRACE_A, TRACE_B])
def test_trace_replays_exactly(name):
    trace = load_trace(name)
    r = Replayer(trace)
    problems: list[str] = []
    prev: Dump | None = None
    for actions, dump in trace.segments():
        for step in actions:
            problems += [f"before dump {dump.step}: {d}" for d in r.apply(step)]
        problems += [f"dump {dump.step} ({dump.label}): {d}" for d in r.check(dump, prev)]
        prev = dump
    for step in trace.trailing_steps():
        problems += r.apply(step)
    assert not problems, "\n".join(problems)
    # the EBUSY offlines (and the failed eject of DIMM1) needed exactly one pinned block
    assert r.pinned == ["memory32"]
