"""/sys/devices/system/node and /sys/bus/node: the attribute tables of drivers/base/node.c (6.1).

What numactl/libnuma read: the node masks, nodeN/{cpumap,cpulist,distance,meminfo,numastat,
vmstat}, and the nodeN directories themselves (libnuma's set_configured_nodes() lists
them). nodeN/subsystem points at /sys/bus/node, whose devices/nodeN link back.
"""
from __future__ import annotations

from ..machine.hotplug import MF_STATS, Machine
from .kernfs import Dir, DynDir, Link, Node, attr_ro, attr_rw, bus_dir
from .parse import bitmap_list
from .procfs import node_meminfo, node_vmstat


def nodelist(ids: list[int]) -> str:
    """A node mask file: "%*pbl" and a newline ("0", "0-2", "0,2-3")."""
    return bitmap_list(ids) + "\n"


def bitmap_mask(ids: tuple[int, ...] | list[int], nbits: int) -> str:
    """The kernel's "%*pb" (lib/vsprintf.c bitmap_string()): hex in 32-bit chunks, most
    significant first, comma separated; the first chunk only as wide as its bits need."""
    value = 0
    for i in ids:
        value |= 1 << i
    chunks = []
    for start in range(((nbits - 1) // 32) * 32, -1, -32):
        width = 8 if start + 32 <= nbits else (nbits - start + 3) // 4
        chunks.append(f"{(value >> start) & 0xffffffff:0{width}x}")
    return ",".join(chunks)


def node_distance_show(m: Machine, nid: int) -> str:
    """node_read_distance(): one entry per online node; the separator is " " unless i == 0
    (so a machine whose node 0 is offline prints a leading space, as the kernel does)."""
    with m.lock:
        online = [i for i in sorted(m.nodes) if m.nodes[i].online]
        return "".join(f"{' ' if i else ''}{m.node_distance(nid, i)}" for i in online) + "\n"


def node_numastat_show() -> str:
    """node_read_numastat(): memfs has no page allocator, so no NUMA allocation counts."""
    return "".join(f"{k} 0\n" for k in ("numa_hit", "numa_miss", "numa_foreign", "interleave_hit",
                                        "local_node", "other_node"))


def node_dir(m: Machine, nid: int) -> DynDir:
    node = m.nodes[nid]
    fixed: dict[str, Node] = {
        "cpumap": attr_ro(lambda: bitmap_mask(node.cpu_ids, m.nr_cpu_ids()) + "\n"),
        "cpulist": attr_ro(lambda: bitmap_list(node.cpu_ids) + "\n"),
        "distance": attr_ro(lambda: node_distance_show(m, nid)),
        "meminfo": attr_ro(lambda: node_meminfo(m, nid)),
        "numastat": attr_ro(node_numastat_show),
        "vmstat": attr_ro(lambda: node_vmstat(m, nid)),
        "subsystem": Link("../../../../bus/node"),
        "uevent": attr_rw(lambda: "", lambda b: None),
    }
    if m.profile.mf_stats:
        fixed["memory_failure"] = memory_failure_dir(m, nid)

    def lookup(name: str) -> Node | None:
        hit = fixed.get(name)
        if hit is not None:
            return hit
        if name.startswith("memory") and name[6:].isascii() and name[6:].isdigit() and str(int(name[6:])) == name[6:] \
                and int(name[6:]) in node.blocks:
            return Link(f"../../memory/{name}")
        return None

    return DynDir(lambda: sorted(fixed) + [f"memory{b}" for b in sorted(node.blocks)], lookup)


def _node_name(name: str, m: Machine) -> int | None:
    """nid of an online node's device name "nodeN" (canonical decimal only), else None."""
    if name.startswith("node") and name[4:].isascii() and name[4:].isdigit() and str(int(name[4:])) == name[4:]:
        nid = int(name[4:])
        if nid in m.nodes and m.nodes[nid].online:
            return nid
    return None


def memory_failure_dir(m: Machine, nid: int) -> Dir:
    """nodeN/memory_failure/: mm/memory-failure.c MF_ATTR_RO(), "%lu\n" of NODE_DATA(nid)->mf_stats."""
    return Dir({name: attr_ro(lambda name=name: f"{m.mf_stats[nid][name]}\n") for name in MF_STATS})


def node_root(m: Machine) -> DynDir:
    def online() -> list[int]:
        return [n for n, node in m.nodes.items() if node.online]

    fixed: dict[str, Node] = {
        "possible": attr_ro(lambda: nodelist(list(m.nodes))),
        "online": attr_ro(lambda: nodelist(online())),
        "has_memory": attr_ro(lambda: nodelist([n for n, x in m.nodes.items() if x.has_memory()])),
        "has_normal_memory": attr_ro(lambda: nodelist(m.normal_memory_nodes())),
        "has_cpu": attr_ro(lambda: nodelist([n for n, x in m.nodes.items() if x.cpus])),
    }
    dirs: dict[int, DynDir] = {}

    def lookup(name: str) -> Node | None:
        hit = fixed.get(name)
        if hit is not None:
            return hit
        nid = _node_name(name, m)
        if nid is not None:
            if nid not in dirs:
                dirs[nid] = node_dir(m, nid)
            return dirs[nid]
        return None

    return DynDir(lambda: sorted(fixed) + [f"node{n}" for n in sorted(online())], lookup)


def bus_node(m: Machine) -> Dir:
    """/sys/bus/node (node_subsys): devices/nodeN links plus the bus's own files."""
    def lookup(name: str) -> Node | None:
        if _node_name(name, m) is not None:
            return Link(f"../../../devices/system/node/{name}")
        return None

    return bus_dir(DynDir(lambda: [f"node{n}" for n in sorted(m.nodes) if m.nodes[n].online], lookup))
