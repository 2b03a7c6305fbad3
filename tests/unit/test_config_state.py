"""The [[state]] section: block states applied at mount through the model's own paths.

Applying a description's [[state]] must leave exactly the machine that the same writes
to memoryN/state leave (drivers/base/memory.c state_store()), accounting included.
"""
from __future__ import annotations

import copy
import tomllib

import pytest

from memfs.machine.config import ConfigError, default_text, from_dict, parse_block_list
from memfs.machine.hotplug import Machine
from memfs.status import snapshot
from tests.unit.sysroot import MEM, Sysroot

DEFAULT = tomllib.loads(default_text())


def with_states(states: list[dict], **boot) -> dict:
    d = copy.deepcopy(DEFAULT)
    d["state"] = states
    d["boot"].update(boot)
    return d


def views(m: Machine) -> dict[str, str]:
    """Everything a reader sees that accounting feeds."""
    s = Sysroot(m)
    out = {p: s.read(p) for p in ("/proc/meminfo", "/proc/zoneinfo", "/proc/vmstat",
                                  "/sys/devices/system/node/node0/meminfo")}
    for b in m.block_ids():
        for f in ("state", "online", "valid_zones"):
            out[f"memory{b}/{f}"] = s.read(f"{MEM}/memory{b}/{f}")
    return out


def vz(m: Machine, bid: int) -> str:
    with m.lock:
        return m.valid_zones(m.blocks[bid])


def written(writes: list[tuple[int, str]], **boot) -> Machine:
    m = Machine(from_dict(with_states([], **boot)))
    s = Sysroot(m)
    for bid, word in writes:
        assert s.write(f"{MEM}/memory{bid}/state", word.encode()) is None, (bid, word)
    return m


@pytest.mark.parametrize("text, ids", [
    (32, [32]), ([32, 40], [32, 40]), ("0-7,32-41", [*range(8), *range(32, 42)]), ("5", [5]),
])
def test_block_lists(text, ids):
    assert parse_block_list(text, "k") == ids


@pytest.mark.parametrize("bad", ["", "7-3", "a", "1,,2", -1, [], [True], 1.5, True])
def test_bad_block_lists_are_refused(bad):
    with pytest.raises(ConfigError, match=r"^k: expected block ids like 32"):
        parse_block_list(bad, "k")


def test_states_give_the_machine_the_writes_give():
    states = [{"blocks": "32-33", "state": "online_movable", "zone": "Movable"},
              {"blocks": "34-41", "state": "online_kernel", "zone": "Normal"},
              {"blocks": "1-5", "state": "offline"}]
    m = Machine(from_dict(with_states(states)))
    ref = written([(32, "online_movable"), (33, "online_movable")] + [(b, "online_kernel") for b in range(34, 42)]
                  + [(b, "offline") for b in range(1, 6)])
    assert views(m) == views(ref)
    assert snapshot(m)["meminfo"] == snapshot(ref)["meminfo"]
    assert m.generation == 0


def test_auto_onlined_blocks_move_to_the_described_zone():
    m = Machine(from_dict(with_states([{"blocks": "41", "state": "online_movable", "zone": "Movable"}],
                                      memhp_default_state="online")))
    assert [vz(m, b) for b in (40, 41)] == ["Normal", "Movable"]
    # auto-onlined into Normal at plug, then offlined and onlined movable: the events say so
    acts = [(e.action, e.devpath.rsplit("/", 1)[1]) for e in m.events.since(0) if e.devpath.endswith("memory41")]
    assert acts == [("add", "memory41"), ("online", "memory41"), ("offline", "memory41"), ("online", "memory41")]


def test_plain_online_takes_the_default_zone():
    m = Machine(from_dict(with_states([{"blocks": [32], "state": "online"}])))
    assert (m.blocks[32].state, vz(m, 32)) == ("online", "Normal")


@pytest.mark.parametrize("states, message", [
    ([{"blocks": "0", "state": "offline"}],
     r"^state\[0\]: writing offline to memory0/state fails \(EINVAL: memory0 spans multiple zones\)"),
    ([{"blocks": "7", "state": "offline"}],
     r"^state\[0\]: writing offline to memory7/state fails \(EINVAL: memory7: failed due to memory holes\)"),
    ([{"blocks": "6", "state": "offline"}],
     r"^state\[0\]: writing offline to memory6/state fails \(EBUSY: memory6: unmovable pages"),
    ([{"blocks": "32", "state": "online"}, {"blocks": "99", "state": "online"}],
     r"^state\[1\]\.blocks: memory99 does not exist on this machine \(it has memory0 to memory41"),
    ([{"blocks": "1", "state": "online_kernel", "zone": "Normal"}],
     r"^state\[0\]: memory1 goes online in DMA32, not Normal$"),
    ([{"blocks": "1", "state": "online_movable", "zone": "Normal"}],
     r"^state\[0\]\.zone: online_movable cannot put a block into Normal$"),
    ([{"blocks": "1", "state": "offline", "zone": "Normal"}],
     r"^state\[0\]\.zone: only for blocks that go online"),
    ([{"blocks": "1", "state": "up"}], r"^state\[0\]\.state: one of offline, online, online_kernel, online_movable"),
    ([{"blocks": "1"}], r"^state\[0\]: every \[\[state\]\] needs blocks and state"),
    ([{"blocks": "1", "state": "online", "node": 0}], r"^state\[0\]\.node: unknown key"),
    ([{"blocks": "1", "state": "online", "zone": "HighMem"}],
     r"^state\[0\]\.zone: one of DMA, DMA32, Normal, Movable$"),
])
def test_impossible_states_are_refused_naming_the_entry(states, message):
    with pytest.raises(ConfigError, match=message):
        Machine(from_dict(with_states(states)))


# ---------------------------------------------------------------- [[dimm]] slot
def test_a_dimm_sits_in_the_slot_the_description_gives():
    d = with_states([])
    d["dimm"] = [{"id": "dimm3", "size": "1G", "slot": 2}, {"id": "dimm4", "size": "128M"}]
    m = Machine(from_dict(d))
    assert [(x.id, x.slot) for x in m.devices.values()] == [("dimm3", 2), ("dimm4", 0)]
    s = Sysroot(m)
    assert s.tree.resolve(f"{MEM}/memory32/firmware_node").target.endswith("/PNP0C80:02")
    assert s.read("/sys/devices/LNXSYSTM:00/LNXSYBUS:00/PNP0A06:04/PNP0C80:01/status") == "0\n"  # empty


@pytest.mark.parametrize("dimms, message", [
    ([{"size": "128M", "slot": 8}], r"^dimm 'dimm1': slot 8 is not one of the 8 slots \(0-7\)$"),
    ([{"size": "128M", "slot": 1}, {"size": "128M", "slot": 1}], r"^dimm 'dimm2': slot 1 holds 'dimm1' already$"),
    ([{"size": "128M", "slot": 1, "driver": "virtio_mem"}],
     r"^dimm\[0\]\.slot: only ACPI DIMMs \(driver = \"acpi\"\) sit in a slot$"),
])
def test_impossible_slots_are_refused(dimms, message):
    d = with_states([])
    d["dimm"] = dimms
    with pytest.raises(ConfigError, match=message):
        from_dict(d)
