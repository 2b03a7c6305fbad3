"""`state` and `online` stores through the sysfs attribute tables.

drivers/base/memory.c state_store(): sysfs_streq against the four names, EINVAL when the
block is already in the requested state (device_online/device_offline return 1).
drivers/base/core.c online_store(): kstrtobool, and "already there" is a silent success.
"""
from __future__ import annotations

import errno

import pytest

from memfs.machine.blocks import MMOP_OFFLINE, MMOP_ONLINE_MOVABLE
from memfs.machine.hotplug import Machine

from tests.support.sysroot import Sysroot, machine

MEM = "/sys/devices/system/memory"




class Sys(Sysroot):

    def state(self, bid: int) -> str:
        return self.read(f"{MEM}/memory{bid}/state").rstrip("\n")

    def zone(self, bid: int) -> str:
        return self.read(f"{MEM}/memory{bid}/valid_zones").rstrip("\n")


def snapshot(m: Machine) -> tuple:
    zones = tuple((z.nid, z.name, z.start_pfn, z.spanned, z.present, z.managed, z.used)
                  for n in m.nodes.values() for z in n.zones)
    blocks = tuple((b.id, b.state, b.dev_offline, b.zone.name if b.zone else None) for b in m.blocks.values())
    return zones, blocks, m.events.seqnum, m.meminfo()["MemTotal"]


@pytest.fixture
def s() -> Sys:
    return Sys(machine())


# ---------------------------------------------------------------- state
def test_state_online_then_same_state_is_einval(s):
    p = f"{MEM}/memory32/state"
    assert s.write(p, b"online_kernel\n") is None
    assert s.state(32) == "online"
    before = snapshot(s.m)
    for word in (b"online\n", b"online_kernel\n", b"online_movable\n"):
        assert s.write(p, word) == errno.EINVAL
    assert snapshot(s.m) == before
    assert s.write(p, b"offline\n") is None
    before = snapshot(s.m)
    assert s.write(p, b"offline\n") == errno.EINVAL
    assert snapshot(s.m) == before


def test_online_file_same_state_is_silent_success_without_uevent(s):
    p = f"{MEM}/memory32/online"
    assert s.read(p) == "0\n"
    before = snapshot(s.m)
    assert s.write(p, b"0\n") is None  # offline -> offline: success, nothing happens
    assert snapshot(s.m) == before
    assert s.write(p, b"1\n") is None
    assert s.read(p) == "1\n" and s.state(32) == "online"
    seq = s.m.events.seqnum
    before = snapshot(s.m)
    assert s.write(p, b"1\n") is None  # online -> online: success, no uevent
    assert s.m.events.seqnum == seq and snapshot(s.m) == before


@pytest.mark.parametrize("data", [
    b"garbage\n", b"\n", b"", b"ONLINE\n", b" online\n", b"online\n\n", b"online \n", b"Online\n",
    b"going-offline\n", b"online_normal\n", b"\0online\n", b"onlin\n",
])
def test_state_refuses_anything_but_the_four_names(s, data):
    before = snapshot(s.m)
    assert s.write(f"{MEM}/memory34/state", data) == errno.EINVAL
    assert snapshot(s.m) == before
    assert s.state(34) == "offline"


@pytest.mark.parametrize("data", [b"online_movable", b"online_movable\n"])
def test_state_one_trailing_newline_is_optional(s, data):
    assert s.write(f"{MEM}/memory34/state", data) is None
    assert s.zone(34) == "Movable"


def test_state_offline_without_newline(s):
    s.write(f"{MEM}/memory34/state", b"online")
    assert s.write(f"{MEM}/memory34/state", b"offline") is None
    assert s.state(34) == "offline"


# ---------------------------------------------------------------- kstrtobool per profile
ACCEPT_EVERYWHERE = [(b"1", True), (b"y", True), (b"Y\n", True), (b"yes", True), (b"on", True), (b"ON\n", True),
                     (b"1junk", True), (b"0", False), (b"n", False), (b"N", False), (b"no", False),
                     (b"off", False), (b"oF", False)]
REFUSED_EVERYWHERE = [b"2\n", b"o", b"o\n", b"ox", b"x", b"\n", b"", b" 1", b"-1", b"+1"]


@pytest.mark.parametrize("kernel", ["5.13", "5.15", "6.1", "6.6", "6.12", "6.19"])
@pytest.mark.parametrize("data, value", ACCEPT_EVERYWHERE)
def test_online_kstrtobool_common_alphabet(kernel, data, value):
    s = Sys(machine(kernel))
    if not value:
        s.write(f"{MEM}/memory34/online", b"1")
    assert s.write(f"{MEM}/memory34/online", data) is None
    assert s.state(34) == ("online" if value else "offline")


@pytest.mark.parametrize("kernel", ["5.13", "6.1", "6.19"])
@pytest.mark.parametrize("data", REFUSED_EVERYWHERE)
def test_online_kstrtobool_refusals(kernel, data):
    s = Sys(machine(kernel))
    before = snapshot(s.m)
    assert s.write(f"{MEM}/memory34/online", data) == errno.EINVAL
    assert snapshot(s.m) == before


@pytest.mark.parametrize("kernel, tf, ed", [
    ("5.13", False, False), ("5.15", False, False),  # 5.12-5.14 trees: y/n/1/0/on/off only
    ("6.1", True, False), ("6.6", True, False), ("6.12", True, False),  # t/f since 5.19 (parse.py)
    ("6.19", True, True),  # e/d since 6.19
])
@pytest.mark.parametrize("true_word, false_word, family", [
    (b"t", b"f", "tf"), (b"True\n", b"false\n", "tf"), (b"T", b"F", "tf"),
    (b"e", b"d", "ed"), (b"enabled", b"disabled", "ed"), (b"E\n", b"D\n", "ed"),
])
def test_online_kstrtobool_alphabet_per_profile(kernel, tf, ed, true_word, false_word, family):
    ok = tf if family == "tf" else ed
    s = Sys(machine(kernel))
    p = f"{MEM}/memory34/online"
    assert s.write(p, true_word) == (None if ok else errno.EINVAL)
    assert s.state(34) == ("online" if ok else "offline")
    if ok:
        assert s.write(p, false_word) is None
        assert s.state(34) == "offline"
    else:
        s.write(p, b"1")
        assert s.write(p, false_word) == errno.EINVAL
        assert s.state(34) == "online"


# ---------------------------------------------------------------- the stale online_type quirk
def test_stale_online_type_after_einval_onlines_movable_later(s):
    """state_store() sets mem->online_type before device_online(), which returns 1 for an
    online block: the EINVAL leaves online_type = MMOP_ONLINE_MOVABLE behind, and the next
    device_online() without a type (the `online` file) uses it instead of MMOP_ONLINE.
    (drivers/base/memory.c state_store / memory_subsys_online, 6.6 tree.)"""
    st, on = f"{MEM}/memory34/state", f"{MEM}/memory34/online"
    assert s.write(st, b"online_kernel\n") is None
    assert s.zone(34) == "Normal"
    assert s.write(st, b"online_movable\n") == errno.EINVAL
    mem = s.m.blocks[34]
    assert mem.online_type == MMOP_ONLINE_MOVABLE
    assert s.zone(34) == "Normal"  # nothing changed
    assert s.write(st, b"offline\n") is None
    assert mem.online_type == MMOP_ONLINE_MOVABLE  # offlining does not reset it
    # the default zone for this block is Normal ...
    assert s.zone(34).split()[0] == "Normal"
    # ... but `echo 1 > online` uses the stale type
    assert s.write(on, b"1\n") is None
    assert s.zone(34) == "Movable"
    assert mem.online_type == MMOP_OFFLINE  # memory_subsys_online resets it after the attempt


def test_stale_online_type_via_online_file_write_of_1(s):
    """The same quirk through `online`: `echo 1 > online` on an online block is a no-op and
    does not touch online_type; only `state` writes leave it behind."""
    s.write(f"{MEM}/memory34/state", b"online_kernel")
    s.write(f"{MEM}/memory34/online", b"1")
    assert s.m.blocks[34].online_type == MMOP_OFFLINE


def test_online_type_reset_after_failed_online():
    from memfs.machine.hotplug import EHWPOISON
    s = Sys(machine("6.6"))
    s.write(f"{MEM}/memory34/state", b"online_movable")
    s.m.memory_failure(34 * (128 << 20), soft=False)
    assert s.write(f"{MEM}/memory34/state", b"offline") is None
    assert s.write(f"{MEM}/memory34/state", b"online_movable") == EHWPOISON
    assert s.m.blocks[34].online_type == MMOP_OFFLINE
    assert s.state(34) == "offline"


def test_offline_transient_state_and_failure_restores_online(s):
    """memory_block_change_state(): going-offline meanwhile, back to online on failure."""
    seen = []
    s.write(f"{MEM}/memory32/state", b"online_kernel")
    s.m.alloc("unmovable", 4096, block_id=32)
    orig = s.m.memory_block_offline

    def spy(mem):
        seen.append(mem.state)
        return orig(mem)

    s.m.memory_block_offline = spy
    before = snapshot(s.m)
    assert s.write(f"{MEM}/memory32/state", b"offline") == errno.EBUSY
    assert seen == ["going-offline"]
    assert s.state(32) == "online" and snapshot(s.m) == before


def test_boot_memory0_cannot_be_offlined(s):
    """memory0 spans DMA and DMA32 and has holes: valid_zones none, offline EINVAL both ways."""
    assert s.zone(0) == "none"
    before = snapshot(s.m)
    assert s.write(f"{MEM}/memory0/state", b"offline") == errno.EINVAL
    assert s.write(f"{MEM}/memory0/online", b"0") == errno.EINVAL
    assert snapshot(s.m) == before
    # memory7 ends in the 0x3ffe0000 hole: EINVAL too
    assert s.write(f"{MEM}/memory7/state", b"offline") == errno.EINVAL


def test_state_show_names_and_online_show():
    s = Sys(machine())
    assert s.read(f"{MEM}/memory1/state") == "online\n" and s.read(f"{MEM}/memory1/online") == "1\n"
    assert s.read(f"{MEM}/memory32/state") == "offline\n" and s.read(f"{MEM}/memory32/online") == "0\n"
    assert s.read(f"{MEM}/memory32/phys_index") == "00000020\n"
