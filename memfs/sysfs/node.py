"""/sys/devices/system/node: node masks, nodeN/meminfo and nodeN/memoryM links."""
from __future__ import annotations

from ..machine.hotplug import MF_STATS, Machine
from .kernfs import Dir, DynDir, Link, Node, attr_ro
from .parse import bitmap_list
from .procfs import node_meminfo


def nodelist(ids: list[int]) -> str:
    """A node mask file: "%*pbl" and a newline ("0", "0-2", "0,2-3")."""
    return bitmap_list(ids) + "\n"


def node_dir(m: Machine, nid: int) -> DynDir:
    node = m.nodes[nid]
    fixed: dict[str, Node] = {
        "meminfo": attr_ro(lambda: node_meminfo(m, nid)),
        "cpulist": attr_ro(lambda: "0\n" if node.cpus and nid == min(m.nodes) else "\n"),
        "subsystem": Link("../../../../bus/node"),
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
        if name.startswith("node") and name[4:].isascii() and name[4:].isdigit() and str(int(name[4:])) == name[4:]:
            nid = int(name[4:])
            if nid in m.nodes and m.nodes[nid].online:
                if nid not in dirs:
                    dirs[nid] = node_dir(m, nid)
                return dirs[nid]
        return None

    return DynDir(lambda: sorted(fixed) + [f"node{n}" for n in sorted(online())], lookup)
