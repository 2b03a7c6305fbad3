"""The whole sysroot: sys/ and proc/ views of one Machine, as a kernfs Tree."""
from __future__ import annotations

from ..machine.hotplug import Machine
from .acpi import acpi_trees
from .kernfs import Dir, Node, Tree, attr_ro, attr_rw
from .memory import BlockDirs, bus_memory, memory_root
from .node import bus_node, node_root
from .params import params_dir
from .procfs import meminfo, vmstat, zoneinfo


def build_tree(m: Machine) -> Tree:
    blocks = BlockDirs(m)
    acpi_bus, lnxsystm = acpi_trees(m)
    module: dict[str, Node] = {}
    params = params_dir(m)
    if params is not None:
        module["memory_hotplug"] = Dir({"parameters": params, "uevent": attr_rw(lambda: "", lambda b: None)})
    sys = Dir({
        "bus": Dir({"memory": bus_memory(m), "node": bus_node(m), "acpi": acpi_bus}),
        "devices": Dir({
            "system": Dir({"memory": memory_root(m, blocks), "node": node_root(m)}),
            "LNXSYSTM:00": lnxsystm,
        }),
        "module": Dir(module),
    })
    proc = Dir({
        "meminfo": attr_ro(lambda: meminfo(m)),
        "zoneinfo": attr_ro(lambda: zoneinfo(m)),
        "vmstat": attr_ro(lambda: vmstat(m)),
    })
    return Tree(Dir({"sys": sys, "proc": proc}))
