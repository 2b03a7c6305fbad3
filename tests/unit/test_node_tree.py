"""The node tree as numactl/libnuma read it: drivers/base/node.c (6.1) formats and /sys/bus/node.

Formats: node_read_distance() ("%d" joined by " " unless i == 0), node_read_cpumap()
("%*pb", lib/vsprintf.c bitmap_string(): 32-bit hex chunks, the first one as wide as
nr_cpu_ids needs), node_read_cpulist() ("%*pbl"), node_read_numastat(), node_read_vmstat().
"""
from __future__ import annotations

import pytest

from memfs.machine.config import ConfigError, from_dict
from memfs.machine.hotplug import Machine
from memfs.sysfs.node import bitmap_mask

from tests.support.sysroot import Sysroot, memoryless_node1_machine

NODE = "/sys/devices/system/node"
MiB = 1 << 20


def three_nodes() -> Sysroot:
    """Two nodes with RAM and CPUs 0-3 / 4-7, a third without either; a SLIT with 21 and 31."""
    return Sysroot(Machine(from_dict({"node": [
        {"id": 0, "ram": ["0x100000-0x40000000"], "cpus": "0-3", "distance": [10, 21, 31]},
        {"id": 1, "ram": ["0x40000000-0x80000000"], "cpus": "4-7", "distance": [21, 10, 31]},
        {"id": 2, "cpus": False, "distance": [31, 31, 10]},
    ]})))


@pytest.mark.parametrize("ids, nbits, text", [
    ((0,), 1, "1"), ((0, 1), 2, "3"), ((0,), 4, "1"), ((4, 5, 6, 7), 8, "f0"), ((0,), 33, "0,00000001"),
    ((32,), 33, "1,00000000"), ((), 64, "00000000,00000000"), ((63,), 64, "80000000,00000000"),
])
def test_cpumap_format(ids, nbits, text):
    assert bitmap_mask(ids, nbits) == text


def test_node_files_of_a_three_node_machine():
    s = three_nodes()
    assert s.read(f"{NODE}/possible") == "0-2\n"
    assert s.read(f"{NODE}/online") == "0-1\n"
    assert s.read(f"{NODE}/has_memory") == s.read(f"{NODE}/has_normal_memory") == "0-1\n"
    assert s.read(f"{NODE}/has_cpu") == "0-1\n"
    assert s.read(f"{NODE}/node0/cpulist") == "0-3\n" and s.read(f"{NODE}/node0/cpumap") == "0f\n"
    assert s.read(f"{NODE}/node1/cpulist") == "4-7\n" and s.read(f"{NODE}/node1/cpumap") == "f0\n"
    # only online nodes are listed: node 2 has neither memory nor CPUs
    assert s.read(f"{NODE}/node0/distance") == "10 21\n"
    assert s.read(f"{NODE}/node1/distance") == "21 10\n"
    assert not s.exists(f"{NODE}/node2")
    assert s.read(f"{NODE}/node1/numastat").splitlines() == [
        "numa_hit 0", "numa_miss 0", "numa_foreign 0", "interleave_hit 0", "local_node 0", "other_node 0"]


def test_node_vmstat_free_pages_are_the_nodes():
    s = three_nodes()
    for nid in (0, 1):
        stats = dict(ln.split() for ln in s.read(f"{NODE}/node{nid}/vmstat").splitlines())
        node = s.m.nodes[nid]
        assert int(stats["nr_free_pages"]) == node.managed - node.used
        assert list(stats)[:2] == ["nr_free_pages", "nr_zone_inactive_anon"] and "numa_hit" in stats


def test_distance_after_hot_add_to_a_memoryless_node():
    s = three_nodes()
    s.m.plug(128 * MiB, node=2, dev_id="d", driver="acpi")
    assert s.read(f"{NODE}/online") == "0-2\n"
    assert s.read(f"{NODE}/node2/distance") == "31 31 10\n"
    assert s.read(f"{NODE}/node0/distance") == "10 21 31\n"
    assert s.read(f"{NODE}/node2/cpulist") == "\n" and s.read(f"{NODE}/node2/cpumap") == "00\n"
    assert s.tree.resolve("/sys/bus/node/devices/node2").target == "../../../devices/system/node/node2"


def test_bus_node_and_subsystem_link():
    m = memoryless_node1_machine()
    s = Sysroot(m)
    assert s.tree.resolve(f"{NODE}/node0/subsystem").target == "../../../../bus/node"
    assert s.tree.resolve("/sys/bus/node").names() == ["devices", "drivers", "drivers_autoprobe", "drivers_probe",
                                                      "uevent"]
    assert s.tree.resolve("/sys/bus/node/devices").names() == ["node0"]
    assert not s.exists("/sys/bus/node/devices/node1") and not s.exists("/sys/bus/node/devices/node00")
    m.plug(128 * MiB, node=1, dev_id="d")
    assert s.tree.resolve("/sys/bus/node/devices").names() == ["node0", "node1"]
    # default distances and one CPU per node with CPUs
    assert s.read(f"{NODE}/node1/distance") == "20 10\n" and s.read(f"{NODE}/node0/cpulist") == "0\n"


def test_leading_space_when_node0_is_offline():
    """node_read_distance() separates with `i ? " " : ""`, not by position."""
    s = Sysroot(Machine(from_dict({"node": [{"id": 0, "cpus": False},
                                            {"id": 1, "ram": ["0x100000-0x40000000"]}]})))
    assert s.read(f"{NODE}/online") == "1\n"
    assert s.read(f"{NODE}/node1/distance") == " 10\n"


@pytest.mark.parametrize("nodes, message", [
    ([{"id": 0, "ram": ["0x100000-0x40000000"], "distance": [10, 20]}], r"^node\[0\]\.distance: one distance per"),
    ([{"id": 0, "ram": ["0x100000-0x40000000"], "distance": [11]}], r"^node\[0\]\.distance: 11 to node 0"),
    ([{"id": 0, "ram": ["0x100000-0x40000000"], "distance": [10, 10]}, {"id": 1}],
     r"^node\[0\]\.distance: 10 to node 1"),
    ([{"id": 0, "ram": ["0x100000-0x40000000"], "cpus": "0-3"}, {"id": 1, "cpus": "3"}],
     r"^node\[1\]\.cpus: CPU 3 is on node 0"),
    ([{"id": 0, "ram": ["0x100000-0x40000000"], "cpus": "3-1"}], r"^node\[0\]\.cpus: expected true or false"),
])
def test_bad_node_topology_refused(nodes, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"node": nodes})
