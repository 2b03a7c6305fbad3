"""What the model keeps grows with the machine, not with its history: cycles of operations
that cancel out leave every table the size it was (except the bounded uevent history).
The daemon-level check (RSS and descriptors over 100,000 operations) is
tests/integration/test_reliability_leaks.py."""
from __future__ import annotations

import pytest

from memfs.machine.hotplug import Machine


def sizes(m: Machine) -> dict[str, int]:
    return {"blocks": len(m.blocks), "devices": len(m.devices), "groups": len(m.groups),
            "allocs": len(m.allocator.allocs), "poisoned": len(m.poisoned),
            "node blocks": sum(len(n.blocks) for n in m.nodes.values()),
            "zone members": sum(len(z.members) for n in m.nodes.values() for z in n.zones)}


@pytest.mark.parametrize("driver", ["virtio_mem", "dax_kmem", "probe", "acpi"])
def test_plug_unplug_cycles_leave_nothing_behind(driver):
    m = Machine.from_config(overrides={"boot.memhp_default_state": "online_movable"})
    m.plug(1 << 30, driver=driver, dev_id="warm")
    m.unplug("warm")
    before = sizes(m)
    for i in range(300):
        m.plug(1 << 30, driver=driver, dev_id=f"d{i}")
        a = m.alloc("movable", 1 << 20)
        m.free(a.id)
        m.unplug(f"d{i}")
    assert sizes(m) == before


def test_event_history_is_bounded():
    m = Machine.from_config()
    cap = m.events.history.maxlen
    assert cap == 100_000
    while m.events.seqnum < cap + 1000:  # dax/kmem: all 64 blocks at once (virtio-mem stops at 1 GiB offline)
        m.plug(8 << 30, driver="dax_kmem", dev_id="v")
        m.unplug("v")
    assert len(m.events.history) == cap


def test_acpi_ost_reports_are_bounded():
    m = Machine.from_config()
    for i in range(20_000):
        m.plug(128 << 20, dev_id="x")
        m.unplug("x")
    assert len(m.ost_log) <= 10_000
