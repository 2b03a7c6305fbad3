"""A model plus its sysfs tree, driven without FUSE: what the unit tests share."""
from __future__ import annotations

from memfs.machine.config import from_dict, load_config
from memfs.machine.hotplug import Machine
from memfs.sysfs.tree import build_tree

MEM = "/sys/devices/system/memory"


def memoryless_node1_machine(memmap_on_memory: bool = True) -> Machine:
    """1 GiB of boot RAM on node 0; node 1 possible, without memory or CPUs (offline)."""
    return Machine(from_dict({
        "kernel": "6.1", "boot": {"memmap_on_memory": memmap_on_memory},
        "node": [{"id": 0, "ram": ["0x100000-0x40000000"]}, {"id": 1, "ram": [], "cpus": False}],
    }))


def machine(kernel: str = "6.1", **overrides) -> Machine:
    """The reference VM (three offline DIMMs: memory32, memory33, memory34..41)."""
    return Machine(load_config(None, overrides=overrides, kernel=kernel))


class Sysroot:
    """Reads and writes go through the attribute tables, as a mount's would."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.tree = build_tree(m)

    def read(self, path: str) -> str:
        return self.tree.resolve(path).show()

    def exists(self, path: str) -> bool:
        try:
            self.tree.resolve(path)
        except OSError:
            return False
        return True

    def write(self, path: str, data: bytes) -> int | None:
        """errno of the store, None on success."""
        try:
            self.tree.resolve(path).store(data)
        except OSError as e:
            return e.errno
        return None
