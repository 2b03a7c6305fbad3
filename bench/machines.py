"""Machines of a given number of memory blocks, for the benchmarks."""
from __future__ import annotations

from memfs.machine.config import from_dict
from memfs.machine.hotplug import Machine

BLOCK = 128 << 20


def bench_config(blocks: int) -> dict:
    """``blocks - 1`` boot blocks of 128 MiB on node 0 plus one offline 128 MiB DIMM.

    The DIMM's block (the last one) starts offline (memhp_default_state=offline),
    so it can be onlined and offlined forever: the benchmarks' write target.
    """
    if blocks < 2:
        raise ValueError("a bench machine needs at least 2 blocks")
    boot_end = (blocks - 1) * BLOCK
    return {
        "block_size": "128M",
        "hotplug": {"base": boot_end, "size": 8 * BLOCK, "slots": 8},
        "boot": {"memhp_default_state": "offline"},
        "node": [{"id": 0, "ram": [f"0x100000-{boot_end:#x}"]}],
        "dimm": [{"id": "dimm1", "size": "128M"}],
    }


def bench_machine(blocks: int) -> Machine:
    return Machine(from_dict(bench_config(blocks)))


def target_block(m: Machine) -> int:
    """The id of the hot-pluggable (offline at boot) block."""
    return m.devices["dimm1"].block_ids[0]
