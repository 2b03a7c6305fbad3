"""Replay the f_virtio_mem traces of Debian's 6.1, 6.12 and 7.2 through the model, dump by dump.

The VM: 1 GiB of boot RAM and a 2 GiB `virtio-mem-pci` device (requested-size 0),
`memhp_default_state=offline memory_hotplug.memmap_on_memory=1`. The host sets the
requested size to 512M (memory32-35 appear offline; the guest onlines 32 into Normal and
33-35 into Movable), 1G (memory36-39 appear; onlined Movable), then 256M: the driver
offlines and removes 39, 38, ..., 34 and keeps 32 (Normal) and 33 (Movable).

Every write's errno, every block attribute and link (no firmware_node), the zone counters,
MemTotal, the parameters, the node links (6.12/7.2: with memory_failure) and the memory
uevents with their SEQNUM steps must match the kernel's exactly. Nothing is pinned or
reproduced by hand here: unlike the ACPI traces, no offline is refused.
"""
import pytest

from .replayer import replay
from .traces import HostAdd, HostResize, load_trace

KERNELS = ("6.1", "6.12", "7.2")


@pytest.mark.parametrize("kernel", KERNELS)
def test_f_virtio_mem_replays_exactly(kernel):
    trace = load_trace("f_virtio_mem", kernel)
    assert [(v.id, v.size, v.requested) for v in trace.cold_virtio_mem] == [("vm0", 2 << 30, 0)]
    assert [(s.device, s.requested >> 20) for s in trace.of_type(HostResize)] == \
        [("vm0", 512), ("vm0", 1024), ("vm0", 256)]
    r, problems, _ = replay(trace)
    assert not problems, "\n".join(problems)
    assert r.pinned == []
    dev = r.machine.devices["vm0"]
    assert (dev.requested, r.machine.virtio_mem_plugged_size(dev), dev.block_ids) == (256 << 20, 256 << 20, [32, 33])
    # the trace's own evidence that the last dump is the state of the driver at rest
    assert [b for b in trace.dumps()[-1].blocks if int(b[len("memory"):]) >= 32] == ["memory32", "memory33"]


@pytest.mark.parametrize("kernel", ["6.12", "7.2"])
@pytest.mark.parametrize("name", ["a_memmap_on", "b_memmap_off"])
def test_acpi_traces_with_container_online_and_memory_failure_replay_exactly(kernel, name):
    """The 6.12/7.2 ACPI scenarios: each runtime DIMM hot-add ends with ACTION=online of
    PNP0A06:04 (SUBSYSTEM=container), and node0 lists memory_failure beside its blocks."""
    trace = load_trace(name, kernel)
    containers = [u for d in trace.dumps() for u in d.uevents if u.get("SUBSYSTEM") == "container"]
    assert len(containers) == len(trace.of_type(HostAdd)) == 2
    assert {(u["ACTION"], u["DEVPATH"]) for u in containers} == {("online", "/devices/system/container/PNP0A06:04")}
    assert "memory_failure" in trace.dumps()[0].node_links["node0"]
    r, problems, _ = replay(trace)
    assert not problems, "\n".join(problems)
