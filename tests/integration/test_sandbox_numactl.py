"""numactl --hardware, unmodified, in a memfs sandbox: libnuma lists /sys/devices/system/node,
reads nodeN/{meminfo,cpumap,distance}, and must print memfs's nodes, sizes and distances,
also after memory is hot-added to a node that had none (it comes online then).

numactl 2.0.16 (numactl.c hardware(), fmt_mem()): sizes are nodeN/meminfo's MemTotal and
MemFree in whole MiB ("%llu MB"); distances are only printed for the listed nodes.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from memfs.pytest_plugin import fuse_unavailable

pytestmark = [
    pytest.mark.skipif(fuse_unavailable() is not None, reason=fuse_unavailable() or ""),
    pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root"),
    pytest.mark.skipif(shutil.which("numactl") is None, reason="numactl missing (apt-get install numactl)"),
    pytest.mark.memfs(config=Path(__file__).parent / "machines" / "numa3.toml"),
]

MEM = "/sys/devices/system/memory"


def expected(m, cpus: dict[int, str], distances: dict[int, list[int]]) -> str:
    nodes = [n for n in m.status()["nodes"] if n["online"]]
    ids = [n["id"] for n in nodes]
    lines = [f"available: {len(ids)} nodes ({'0-' + str(ids[-1]) if ids == list(range(len(ids))) else ids})"]
    for n in nodes:
        lines += [f"node {n['id']} cpus:{cpus[n['id']]}", f"node {n['id']} size: {n['MemTotal'] >> 10} MB",
                  f"node {n['id']} free: {n['MemFree'] >> 10} MB"]
    lines.append("node distances:")
    lines.append("node " + "".join(f"{i:>3} " for i in ids))
    for i in ids:
        lines.append(f"{i:>3}: " + "".join(f"{distances[i][j]:>3} " for j in ids))
    return "\n".join(lines) + "\n"


DIST = {0: [10, 21, 31], 1: [21, 10, 31], 2: [31, 31, 10]}


def test_numactl_hardware_shows_memfs_nodes(memfs_machine):
    m = memfs_machine
    r = m.run("numactl", "--hardware")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected(m, {0: " 0 1", 1: ""}, DIST)
    assert r.stdout.startswith("available: 2 nodes (0-1)\nnode 0 cpus: 0 1\n")
    assert "node 1 size: 512 MB\n" in r.stdout


def test_numactl_after_hot_add_to_a_memoryless_node(memfs_machine):
    m = memfs_machine
    assert "node 2" not in m.run("numactl", "--hardware").stdout
    block = m.plug("256M", node=2)["blocks"][0]["id"]
    r = m.run("numactl", "--hardware")
    assert r.returncode == 0, r.stderr
    # the node is online now, with its blocks offline: 0 MB until they are onlined
    assert r.stdout == expected(m, {0: " 0 1", 1: "", 2: ""}, DIST)
    assert "available: 3 nodes (0-2)\n" in r.stdout and "node 2 size: 0 MB\n" in r.stdout
    for b in (block, block + 1):
        m.write(f"{MEM}/memory{b}/state", "online_movable")
    r = m.run("numactl", "--hardware")
    assert r.stdout == expected(m, {0: " 0 1", 1: "", 2: ""}, DIST)
    assert "node 2 size: 256 MB\n" in r.stdout


@pytest.mark.skipif(not os.path.isdir("/sys/bus/node"), reason="the host kernel has no /sys/bus/node to cover")
def test_sys_bus_node_is_memfs_in_the_sandbox(memfs_machine):
    """nodeN/subsystem points at /sys/bus/node, which the sandbox binds from the mount: its
    devices are memfs's nodes (node1 exists here and not on a one-node host)."""
    m = memfs_machine
    r = m.run("ls", "/sys/bus/node/devices")
    assert r.returncode == 0 and r.stdout.split() == ["node0", "node1"], r.stderr
    r = m.run("cat", "/sys/devices/system/node/node1/subsystem/devices/node1/distance")
    assert r.stdout == "21 10\n", r.stderr
    link = m.path / "sys/bus/node/devices/node2"
    assert not link.exists()  # the kernel may now cache this negative lookup
    m.plug("128M", node=2)  # node 2 comes online: its bus link appears, through the mount's caches
    assert link.is_symlink()
    assert m.run("ls", "/sys/bus/node/devices").stdout.split() == ["node0", "node1", "node2"]
    assert sorted(os.listdir(m.path / "sys/bus/node/devices")) == ["node0", "node1", "node2"]
