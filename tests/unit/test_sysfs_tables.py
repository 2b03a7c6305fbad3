"""The sysfs/procfs attribute tables: synthetic uevents, /proc formats, root files, params, nodes.

lib/kobject_uevent.c kobject_synth_uevent(); fs/proc/meminfo.c, drivers/base/node.c
node_read_meminfo(), mm/vmstat.c zoneinfo_show_print() (per-zone detail and start_pfn
only for populated zones), drivers/base/memory.c root attributes.
"""
from __future__ import annotations

import errno
import re

import pytest

from memfs.machine.hotplug import Machine
from memfs.sysfs.kernfs import Attr

from tests.support.sysroot import Sysroot, machine, memoryless_node1_machine

MEM = "/sys/devices/system/memory"
NODE = "/sys/devices/system/node"
PARAMS = "/sys/module/memory_hotplug/parameters"
MiB = 1 << 20
UUID = "12345678-9abc-def0-1234-56789ABCDEF0"




Sys = Sysroot


@pytest.fixture
def s() -> Sys:
    return Sys(machine())


# ---------------------------------------------------------------- synthetic uevents
def state_of(m: Machine) -> tuple:
    return tuple((b.id, b.state, b.dev_offline) for b in m.blocks.values()), m.meminfo()


@pytest.mark.parametrize("action", ["add", "remove", "change", "move", "online", "offline", "bind", "unbind"])
def test_synthetic_uevent_without_uuid(s, action):
    before = state_of(s.m)
    seq = s.m.events.seqnum
    assert s.write(f"{MEM}/memory32/uevent", action.encode() + b"\n") is None
    (ev,) = s.m.events.since(seq)
    assert ev.env() == [("ACTION", action), ("DEVPATH", "/devices/system/memory/memory32"),
                        ("SUBSYSTEM", "memory"), ("SYNTH_UUID", "0"), ("SEQNUM", str(seq + 1))]
    assert state_of(s.m) == before  # a synthetic `online` does not online the block
    assert s.read(f"{MEM}/memory32/state") == "offline\n"


def test_synthetic_uevent_with_uuid_and_args(s):
    seq = s.m.events.seqnum
    assert s.write(f"{MEM}/memory1/uevent", f"change {UUID} A=1 Key2=value\n".encode()) is None
    (ev,) = s.m.events.since(seq)
    assert ev.to_dict() == {"ACTION": "change", "DEVPATH": "/devices/system/memory/memory1", "SUBSYSTEM": "memory",
                            "SYNTH_UUID": UUID, "SYNTH_ARG_A": "1", "SYNTH_ARG_Key2": "value",
                            "SEQNUM": str(seq + 1)}
    assert ev.netlink_bytes().startswith(b"change@/devices/system/memory/memory1\0ACTION=change\0")
    assert s.write(f"{MEM}/memory1/uevent", f"add {UUID}".encode()) is None
    assert s.m.events.since(seq + 1)[0].extra == (("SYNTH_UUID", UUID),)


@pytest.mark.parametrize("data", [
    b"bogus\n", b"Add\n", b"\n", b"add  \n", b"add junk\n", b"add 1234\n",
    f"change {UUID[:-1]}\n".encode(), f"change {UUID}x\n".encode(), f"change {UUID} A\n".encode(),
    f"change {UUID} A=\n".encode(), f"change {UUID}  A=1\n".encode(), f"change {UUID} A-B=1\n".encode(),
    f"change {UUID} A=1 \n".encode(), f"change {UUID} =1\n".encode(), f"change {UUID} A=x-y\n".encode(),
])
def test_malformed_synthetic_uevent_is_einval(s, data):
    seq = s.m.events.seqnum
    assert s.write(f"{MEM}/memory32/uevent", data) == errno.EINVAL
    assert s.m.events.seqnum == seq


def test_uevent_reads_empty_and_root_uevent_accepts_without_event(s):
    assert s.read(f"{MEM}/memory32/uevent") == ""
    assert s.read(f"{MEM}/uevent") == ""
    seq = s.m.events.seqnum
    assert s.write(f"{MEM}/uevent", b"add\n") is None
    assert s.write(f"{MEM}/uevent", f"change {UUID} A=1".encode()) is None
    assert s.m.events.seqnum == seq  # filtered: the root device has no bus/class
    assert s.write(f"{MEM}/uevent", b"bogus\n") == errno.EINVAL


def test_seqnums_count_boot_add_events():
    m = machine()
    # 8 boot blocks + 10 cold-plugged DIMM blocks each took a SEQNUM
    assert m.events.seqnum == 18
    seq = [e.seqnum for e in m.events.history]
    assert seq == sorted(seq) and len(set(seq)) == len(seq)


# ---------------------------------------------------------------- /proc formats
def test_meminfo_line_format(s):
    lines = s.read("/proc/meminfo").splitlines()
    assert lines[0] == "MemTotal:         915420 kB"
    assert lines[1].startswith("MemFree:  ") and lines[1].endswith(" kB")
    assert "HugePages_Total:       0" in lines
    assert "Hugepagesize:       2048 kB" in lines
    for line in lines:
        assert re.fullmatch(r"[A-Za-z0-9_()]+: +\d+( kB)?", line), line
    hw = [l for l in lines if l.startswith("HardwareCorrupted:")]
    assert hw == ["HardwareCorrupted:     0 kB"]


def test_meminfo_follows_the_model(s):
    s.write(f"{MEM}/memory32/state", b"online")  # dimm1: 128 MiB with memmap_on_memory
    assert s.read("/proc/meminfo").splitlines()[0] == f"MemTotal:        {915420 + 129024:>7} kB"
    assert s.read("/proc/meminfo").splitlines()[0] == "MemTotal:        1044444 kB"


def test_node_meminfo_format(s):
    lines = s.read(f"{NODE}/node0/meminfo").splitlines()
    assert lines[0] == "Node 0 MemTotal:         915420 kB"
    assert lines[1] == f"Node 0 MemFree:        {s.m.meminfo(0)['MemFree']:>8} kB"
    assert lines[-1] == "Node 0 HugePages_Surp:      0"
    for line in lines:
        assert re.fullmatch(r"Node 0 [A-Za-z_()]+: +\d+( kB)?", line), line


def zoneinfo_headers(text: str) -> list[str]:
    return [l for l in text.splitlines() if l.startswith("Node ")]


def test_zoneinfo_headers_and_start_pfn_only_for_populated_zones(s):
    text = s.read("/proc/zoneinfo")
    assert zoneinfo_headers(text) == ["Node 0, zone      DMA", "Node 0, zone    DMA32", "Node 0, zone   Normal",
                                      "Node 0, zone  Movable", "Node 0, zone   Device"]
    assert re.findall(r"^  start_pfn: +(\d+)$", text, re.M) == ["1", "4096"]
    assert text.count("per-node stats") == 1
    s.write(f"{MEM}/memory34/state", b"online_movable")
    text = s.read("/proc/zoneinfo")
    assert re.findall(r"^  start_pfn: +(\d+)$", text, re.M) == ["1", "4096", str(34 * 32768)]
    assert "  start_pfn:           1114112" in text.splitlines()
    normal = text.split("Node 0, zone   Normal")[1].split("Node 0, zone")[0]
    assert "        spanned  0" in normal and "start_pfn" not in normal and "nr_free_pages" not in normal
    movable = text.split("Node 0, zone  Movable")[1].split("Node 0, zone")[0]
    assert "        present  32768" in movable and "        managed  32768" in movable


def test_zoneinfo_numbers_match_the_model(s):
    s.write(f"{MEM}/memory32/state", b"online_kernel")
    text = s.read("/proc/zoneinfo")
    normal = text.split("Node 0, zone   Normal")[1].split("Node 0, zone")[0]
    z = s.m.nodes[0].zone("Normal")
    assert f"        spanned  {z.spanned}" in normal and z.spanned == 32768
    assert f"        present  {z.present}" in normal and z.present == 32768
    assert f"        managed  {z.managed}" in normal and z.managed == 32256
    # the newly populated zone's per-cpu lists hold 112 pages that "pages free" leaves out
    assert f"  pages free     {z.nr_free_pages}" in normal and z.nr_free_pages == 32256 - 112
    assert "              count: 112\n" in normal


@pytest.mark.parametrize("kernel, has", [("5.13", False), ("6.1", False), ("6.8", False), ("6.12", True),
                                         ("6.19", True)])
def test_vmstat_nr_memmap_lines_only_from_6_11(kernel, has):
    text = Sys(machine(kernel)).read("/proc/vmstat")
    names = [l.split()[0] for l in text.splitlines()]
    assert ("nr_memmap_pages" in names) == has and ("nr_memmap_boot_pages" in names) == has
    assert names[0] == "nr_free_pages"


# ---------------------------------------------------------------- root files
def test_root_files(s):
    assert s.read(f"{MEM}/block_size_bytes") == "8000000\n"
    assert s.read(f"{MEM}/auto_online_blocks") == "offline\n"
    node = s.tree.resolve(f"{MEM}/block_size_bytes")
    assert isinstance(node, Attr) and not node.writable and node.mode == 0o444
    for wo in ("soft_offline_page", "hard_offline_page"):
        n = s.tree.resolve(f"{MEM}/{wo}")
        assert n.mode == 0o200 and not n.readable
    assert not s.exists(f"{MEM}/crash_hotplug")
    assert not s.exists(f"{MEM}/probe")


def test_crash_hotplug_from_6_6():
    assert Sys(machine("6.6")).read(f"{MEM}/crash_hotplug") == "0\n"


def test_block_size_bytes_other_sizes():
    m = machine(block_size="1G", dimm=[], hotplug={"base": "4G", "size": "16G", "slots": 8})
    assert Sys(m).read(f"{MEM}/block_size_bytes") == "40000000\n"
    # all boot RAM is memory0 (DMA + DMA32, zone "none"): the booted kernel's pages live there
    assert sorted(m.blocks) == [0] and Sys(m).read(f"{MEM}/memory0/valid_zones") == "none\n"
    ref = machine(dimm=[])
    assert m.meminfo() == ref.meminfo() and m.meminfo()["MemTotal"] == 915420


def test_block_attribute_modes(s):
    for name, mode in [("state", 0o644), ("online", 0o644), ("valid_zones", 0o444), ("phys_index", 0o444),
                       ("phys_device", 0o444), ("removable", 0o444), ("uevent", 0o644)]:
        assert s.tree.resolve(f"{MEM}/memory32/{name}").mode == mode, name
    assert s.read(f"{MEM}/memory32/removable") == "1\n"
    assert s.read(f"{MEM}/memory32/phys_device") == "0\n"
    assert s.tree.resolve(f"{MEM}/memory32/subsystem").target == "../../../../bus/memory"
    assert s.tree.resolve(f"{MEM}/memory32/node0").target == "../../node/node0"


def test_block_names_are_not_zero_padded(s):
    assert s.exists(f"{MEM}/memory1") and not s.exists(f"{MEM}/memory01")
    assert not s.exists(f"{MEM}/memory8")  # beyond boot RAM: no block
    assert not s.exists(f"{MEM}/memory-1")


# ---------------------------------------------------------------- parameters
def test_params_per_profile():
    assert not Sys(machine("5.12")).exists("/sys/module/memory_hotplug")
    p13 = Sys(machine("5.13"))
    assert p13.read(f"{PARAMS}/memmap_on_memory") == "Y\n"
    assert not p13.exists(f"{PARAMS}/online_policy")
    s = Sys(machine("6.1"))
    assert s.read(f"{PARAMS}/online_policy") == "contig-zones\n"
    assert s.read(f"{PARAMS}/auto_movable_ratio") == "301\n"
    assert s.read(f"{PARAMS}/auto_movable_numa_aware") == "Y\n"
    assert not s.tree.resolve(f"{PARAMS}/memmap_on_memory").writable  # 0444


def test_param_stores(s):
    assert s.write(f"{PARAMS}/online_policy", b"auto-movable\n") is None
    assert s.read(f"{PARAMS}/online_policy") == "auto-movable\n"
    for bad in (b"auto_movable", b"Auto-movable", b"", b"contig-zones\n\n"):
        assert s.write(f"{PARAMS}/online_policy", bad) == errno.EINVAL
    assert s.read(f"{PARAMS}/online_policy") == "auto-movable\n"
    assert s.write(f"{PARAMS}/auto_movable_ratio", b"0x64\n") is None
    assert s.read(f"{PARAMS}/auto_movable_ratio") == "100\n"
    assert s.write(f"{PARAMS}/auto_movable_ratio", b"-1") == errno.EINVAL
    assert s.write(f"{PARAMS}/auto_movable_ratio", b"4294967296") == errno.ERANGE
    assert s.write(f"{PARAMS}/auto_movable_numa_aware", b"n") is None
    assert s.read(f"{PARAMS}/auto_movable_numa_aware") == "N\n"
    assert s.write(f"{PARAMS}/auto_movable_numa_aware", b"x") == errno.EINVAL


# ---------------------------------------------------------------- nodes
def test_node_masks_follow_onlining():
    s = Sys(machine())
    assert s.read(f"{NODE}/has_memory") == "0\n"
    assert s.read(f"{NODE}/has_normal_memory") == "0\n"
    assert s.read(f"{NODE}/online") == "0\n" and s.read(f"{NODE}/possible") == "0\n"
    links = [n for n in s.tree.resolve(f"{NODE}/node0").names() if n.startswith("memory")]
    assert links == [f"memory{b}" for b in list(range(8)) + list(range(32, 42))]


def test_memoryless_node_gets_memory():
    m = memoryless_node1_machine()
    s = Sys(m)
    assert s.read(f"{NODE}/possible") == "0-1\n"
    assert s.read(f"{NODE}/online") == "0\n" and not s.exists(f"{NODE}/node1")
    dev = m.plug(128 * MiB, node=1, dev_id="d")
    assert s.read(f"{NODE}/online") == "0-1\n" and s.read(f"{NODE}/has_memory") == "0\n"
    bid = dev.block_ids[0]
    assert s.tree.resolve(f"{NODE}/node1/memory{bid}").target == f"../../memory/memory{bid}"
    s.write(f"{MEM}/memory{bid}/state", b"online_movable")
    assert s.read(f"{NODE}/has_memory") == "0-1\n" and s.read(f"{NODE}/has_normal_memory") == "0\n"
    assert s.read(f"{NODE}/node1/meminfo").startswith("Node 1 MemTotal:         129024 kB\n")
    s.write(f"{MEM}/memory{bid}/state", b"offline")
    m.unplug("d")
    assert s.read(f"{NODE}/online") == "0\n" and not s.exists(f"{NODE}/node1")
