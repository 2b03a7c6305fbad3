"""virtio-mem as a device that resizes: drivers/virtio/virtio_mem.c in Sub Block Mode.

virtio_mem_sbm_plug_request() (unused blocks bottom-up, VIRTIO_MEM_DEFAULT_OFFLINE_THRESHOLD),
virtio_mem_sbm_unplug_request() (offline blocks, then ZONE_MOVABLE, then kernel zones, each
top-down; busy blocks are kept), virtio_mem_memory_notifier_cb(MEM_ONLINE) (retry once half
the threshold is free), memory_group_register_dynamic() (one memory block per unit).
The f_virtio_mem traces (tests/conformance) check the same against real kernels.
"""
from __future__ import annotations

import errno

import pytest

from memfs.machine.config import ConfigError, load_config
from memfs.machine.hotplug import Machine
from memfs.sysfs.tree import build_tree

MEM = "/sys/devices/system/memory"
MiB, GiB = 1 << 20, 1 << 30


def machine(kernel: str = "6.1", dimms: list[dict] | None = None, **overrides: object) -> Machine:
    ov: dict[str, object] = {"dimm": dimms or []}
    ov.update(overrides)
    return Machine(load_config(None, overrides=ov, kernel=kernel))


def events_since(m: Machine, seq: int) -> list[tuple[str, str]]:
    return [(e.action, e.devpath.rsplit("/", 1)[1]) for e in m.events.since(seq)]


def state(m: Machine, bid: int, word: str) -> None:
    build_tree(m).resolve(f"{MEM}/memory{bid}/state").store(word.encode() + b"\n")


def vm_machine(**overrides: object) -> Machine:
    """The f_virtio_mem VM: a 2 GiB virtio-mem device at 4 GiB, requested-size 0."""
    return machine(dimms=[{"id": "vm0", "size": "2G", "driver": "virtio_mem"}], **overrides)


def test_described_device_boots_with_its_requested_size():
    m = machine(dimms=[{"id": "vm0", "size": "2G", "driver": "virtio_mem", "requested": "256M"}])
    dev = m.devices["vm0"]
    assert (dev.start, dev.size, dev.requested) == (4 * GiB, 2 * GiB, 256 * MiB)
    assert dev.block_ids == [32, 33] and m.virtio_mem_plugged_size(dev) == 256 * MiB
    assert vm_machine().devices["vm0"].block_ids == []  # requested defaults to 0


def test_requested_is_checked_at_load():
    for bad, word in (("3G", "no larger"), ("100M", "multiple")):
        with pytest.raises(ConfigError) as ei:
            load_config(None, overrides={"dimm": [{"id": "v", "size": "2G", "driver": "virtio_mem",
                                                   "requested": bad}]})
        assert word in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        load_config(None, overrides={"dimm": [{"id": "d", "size": "128M", "requested": "128M"}]})
    assert "only a virtio-mem device" in str(ei.value)


def test_grow_adds_offline_blocks_bottom_up_without_firmware_node_or_memmap_on_memory():
    m = vm_machine()
    free = m.meminfo()["MemFree"]
    seq = m.events.seqnum
    m.resize("vm0", 512 * MiB)
    assert events_since(m, seq) == [("add", f"memory{b}") for b in (32, 33, 34, 35)]
    tree = build_tree(m)
    for b in (32, 33, 34, 35):
        assert tree.resolve(f"{MEM}/memory{b}/valid_zones").show() == "Normal Movable\n"
        assert tree.resolve(f"{MEM}/memory{b}/state").show() == "offline\n"
        assert m.blocks[b].nr_vmemmap_pages == 0
        with pytest.raises(OSError) as ei:
            tree.resolve(f"{MEM}/memory{b}/firmware_node")
        assert ei.value.errno == errno.ENOENT
    assert free - m.meminfo()["MemFree"] == 4 * 2048  # 4 memmaps of 2 MiB from boot RAM (trace: -8192 kB)


def test_shrink_offlines_and_removes_from_the_top_keeping_what_need_not_go():
    """The f_virtio_mem steps: 512M (32 Normal, 33-35 Movable), 1G (36-39 Movable), 256M."""
    m = vm_machine()
    m.resize("vm0", 512 * MiB)
    state(m, 32, "online")
    for b in (33, 34, 35):
        state(m, b, "online_movable")
    m.resize("vm0", 1 * GiB)
    for b in (36, 37, 38, 39):
        state(m, b, "online_movable")
    seq = m.events.seqnum
    m.resize("vm0", 256 * MiB)
    assert events_since(m, seq) == [(a, f"memory{b}") for b in (39, 38, 37, 36, 35, 34)
                                    for a in ("offline", "remove")]
    assert m.devices["vm0"].block_ids == [32, 33]
    assert m.nodes[0].zone("Movable").present == 32768 and m.nodes[0].zone("Normal").present == 32768


def test_offline_blocks_go_first_then_movable_then_kernel():
    m = vm_machine()
    m.resize("vm0", 512 * MiB)
    state(m, 32, "online_movable")
    state(m, 33, "online_kernel")
    seq = m.events.seqnum
    m.resize("vm0", 128 * MiB)  # 35, 34 offline: removed only; then Movable 32 before kernel 33
    assert events_since(m, seq) == [("remove", "memory35"), ("remove", "memory34"),
                                    ("offline", "memory32"), ("remove", "memory32")]
    assert m.devices["vm0"].block_ids == [33]


def test_before_5_16_online_blocks_go_top_down_whatever_their_zone():
    m = machine("5.15", dimms=[{"id": "vm0", "size": "2G", "driver": "virtio_mem"}])
    m.resize("vm0", 256 * MiB)
    state(m, 32, "online_movable")
    state(m, 33, "online_kernel")
    seq = m.events.seqnum
    m.resize("vm0", 128 * MiB)  # 5.16+ would take Movable memory32; 5.15 takes the top block
    assert events_since(m, seq) == [("offline", "memory33"), ("remove", "memory33")]


def test_busy_block_is_kept_and_the_next_one_tried_then_ebusy():
    m = vm_machine()
    m.resize("vm0", 384 * MiB)
    for b in (32, 33, 34):
        state(m, b, "online_kernel")
    m.alloc("unmovable", 4096, block_id=34)  # the kernel's pages: 34 cannot be offlined
    seq = m.events.seqnum
    m.resize("vm0", 256 * MiB)  # one block must go: 34 is busy, 33 goes instead
    assert events_since(m, seq) == [("offline", "memory33"), ("remove", "memory33")]
    assert m.devices["vm0"].block_ids == [32, 34]
    m.alloc("unmovable", 4096, block_id=32)
    seq = m.events.seqnum
    with pytest.raises(OSError) as ei:
        m.resize("vm0", 0)
    assert ei.value.errno == errno.EBUSY and "could not be unplugged" in ei.value.strerror
    assert events_since(m, seq) == [] and m.devices["vm0"].block_ids == [32, 34]
    assert m.devices["vm0"].requested == 0  # the request stays; resize again retries


def test_replugging_reuses_the_lowest_unused_blocks():
    m = vm_machine()
    m.resize("vm0", 384 * MiB)
    state(m, 32, "online_kernel")
    m.alloc("unmovable", 4096, block_id=32)
    m.resize("vm0", 128 * MiB)  # 34, 33 offline: removed; 32 stays
    seq = m.events.seqnum
    m.resize("vm0", 384 * MiB)
    assert events_since(m, seq) == [("add", "memory33"), ("add", "memory34")]
    assert m.devices["vm0"].block_ids == [32, 33, 34]


def test_offline_threshold_waits_for_onlining():
    """At most 1 GiB the driver added may be offline; onlining frees the way again once
    no more than half of the threshold is offline (MEM_ONLINE notifier)."""
    m = vm_machine()
    seq = m.events.seqnum
    m.resize("vm0", 2 * GiB)
    dev = m.devices["vm0"]
    assert dev.block_ids == list(range(32, 40)) and dev.requested == 2 * GiB
    for b in (32, 33, 34):
        state(m, b, "online_movable")
    assert len(dev.block_ids) == 8  # 640 MiB still offline: more than half the threshold
    seq = m.events.seqnum
    state(m, 35, "online_movable")
    assert events_since(m, seq) == [("online", "memory35")] + [("add", f"memory{b}") for b in (40, 41, 42, 43)]


def test_auto_online_plugs_everything_at_once():
    m = vm_machine(**{"boot.memhp_default_state": "online_movable"})
    seq = m.events.seqnum
    m.resize("vm0", 2 * GiB)
    assert events_since(m, seq) == [(a, f"memory{b}") for b in range(32, 48) for a in ("add", "online")]


def test_plug_keeps_region_and_requested_equal():
    m = machine()
    dev = m.plug(512 * MiB, driver="virtio_mem", dev_id="v")
    assert (dev.size, dev.requested, dev.block_ids) == (512 * MiB, 512 * MiB, [32, 33, 34, 35])


@pytest.mark.parametrize("requested,code", [(3 * GiB, errno.EINVAL), (100 * MiB, errno.EINVAL)])
def test_resize_refuses_sizes_the_device_cannot_take(requested, code):
    m = vm_machine()
    with pytest.raises(OSError) as ei:
        m.resize("vm0", requested)
    assert ei.value.errno == code and m.devices["vm0"].requested == 0


def test_resize_of_other_devices_and_unknown_ids():
    m = machine()
    m.plug(128 * MiB, dev_id="d")
    with pytest.raises(OSError) as ei:
        m.resize("d", 0)
    assert ei.value.errno == errno.EOPNOTSUPP and "only virtio-mem devices resize" in ei.value.strerror
    with pytest.raises(OSError) as ei:
        m.resize("nope", 0)
    assert ei.value.errno == errno.ENOENT


def test_resize_is_journaled_and_replays():
    m = vm_machine()
    log: list[tuple[str, tuple, dict, int | None]] = []
    m.journal = lambda name, args, kw, err: log.append((name, args, kw, err))
    m.resize("vm0", 512 * MiB)
    state(m, 32, "online_kernel")
    m.alloc("unmovable", 4096, block_id=32)
    with pytest.raises(OSError):
        m.resize("vm0", 0)
    assert [(n, e) for n, _, _, e in log] == [("resize", None), ("state_store", None), ("alloc", None),
                                              ("resize", errno.EBUSY)]
    fresh = vm_machine()
    assert fresh.replay(log) == 0
    assert fresh.devices["vm0"].block_ids == m.devices["vm0"].block_ids == [32]


# ---------------------------------------------------------------- the two 6.12+ details of the same traces
def test_acpi_hot_add_onlines_the_container_from_6_8_on():
    """6.12/7.2 traces: `add` of the block, then ACTION=online for PNP0A06:04 (SUBSYSTEM=container);
    6.1: no container event. Cold-plugged DIMMs (at boot) are not hot-adds."""
    for kernel, want in (("6.1", [("add", "memory32", "memory")]),
                         ("6.12", [("add", "memory32", "memory"), ("online", "PNP0A06:04", "container")])):
        m = machine(kernel)
        seq = m.events.seqnum
        m.plug(128 * MiB, dev_id="dimm4")
        got = [(e.action, e.devpath.rsplit("/", 1)[1], e.subsystem) for e in m.events.since(seq)]
        assert got == want, kernel
    ev = m.events.since(seq)[-1]
    assert ev.devpath == "/devices/system/container/PNP0A06:04"
    m = machine("6.12", **{"boot.memhp_default_state": "online"})
    seq = m.events.seqnum
    m.plug(128 * MiB, dev_id="dimm4")  # auto-online happens inside the memory device's attach
    assert [e.action for e in m.events.since(seq)] == ["add", "online", "online"]
    assert m.events.since(seq)[-1].subsystem == "container"


def test_memory_failure_stats_per_node_from_6_6_on():
    m = machine("6.12", **{"boot.memhp_default_state": "online_movable"})
    m.plug(128 * MiB, dev_id="d")
    tree = build_tree(m)
    base = "/sys/devices/system/node/node0/memory_failure"
    assert sorted(tree.resolve(base).names()) == ["delayed", "failed", "ignored", "recovered", "total"]
    assert tree.resolve(f"{base}/total").show() == "0\n"
    m.memory_failure(4 * GiB + 4096, soft=False)
    m.memory_failure(4 * GiB + 8192, soft=True)  # soft offline: no action_result(), not counted
    assert [tree.resolve(f"{base}/{f}").show() for f in ("total", "ignored", "failed", "delayed", "recovered")] \
        == ["1\n", "0\n", "0\n", "0\n", "1\n"]
    with pytest.raises(OSError) as ei:
        build_tree(machine("6.1")).resolve(base)
    assert ei.value.errno == errno.ENOENT


def test_one_block_region_resizes_to_zero_and_back():
    """A region of a single memory block: the block is the whole region, yet still a part
    the driver adds and removes inside its registered device."""
    m = machine()
    dev = m.plug(128 * MiB, driver="virtio_mem", dev_id="v")
    assert dev.block_ids == [32]
    m.resize("v", 0)
    assert dev.block_ids == [] and "v" in m.devices and 32 not in m.blocks
    m.resize("v", 128 * MiB)
    assert dev.block_ids == [32]
