"""The locking contract: kernel-named helpers expect the hotplug lock held by their caller
(lockdep_assert_held() in the kernel), the @journaled operations take it themselves."""
from __future__ import annotations

import threading

import pytest

from memfs.machine.hotplug import MMOP_ONLINE, Machine
from memfs.machine.lockdep import LockNotHeld, lockdep_assert_held
from tests.support.sysroot import machine as default_machine

MiB = 1 << 20


@pytest.fixture
def m() -> Machine:
    return default_machine()


def helper_calls(m: Machine):
    """One call of every helper that must run under Machine.lock, with valid arguments."""
    mem = m.block(32)
    zone = m.nodes[0].zones[-1]
    return {
        "zone_for_pfn_range": lambda: m.zone_for_pfn_range(MMOP_ONLINE, 0, None, mem.start_pfn, mem.nr_pages),
        "default_zone_for_pfn": lambda: m.default_zone_for_pfn(0, mem.start_pfn, mem.nr_pages),
        "default_kernel_zone_for_pfn": lambda: m.default_kernel_zone_for_pfn(0, mem.start_pfn, mem.nr_pages),
        "auto_movable_zone_for_pfn": lambda: m.auto_movable_zone_for_pfn(0, None, mem.start_pfn, mem.nr_pages),
        "auto_movable_can_online_movable": lambda: m.auto_movable_can_online_movable(0, None, mem.nr_pages),
        "valid_zones": lambda: m.valid_zones(mem),
        "test_pages_in_a_zone": lambda: m.test_pages_in_a_zone(m.block(1)),
        "memory_block_online": lambda: m.memory_block_online(mem),
        "memory_block_offline": lambda: m.memory_block_offline(mem),
        "memory_subsys_online": lambda: m.memory_subsys_online(mem),
        "memory_subsys_offline": lambda: m.memory_subsys_offline(mem),
        "device_online": lambda: m.device_online(mem),
        "device_offline": lambda: m.device_offline(mem),
        "remove_memory": lambda: m.remove_memory(mem.device),
        "_adjust_present": lambda: m._adjust_present(mem, zone, 0),
    }


def test_every_helper_refuses_to_run_without_the_lock(m: Machine):
    before = m.generation
    for name, call in helper_calls(m).items():
        with pytest.raises(LockNotHeld):
            call()
        assert m.generation == before, f"{name} changed the machine before checking the lock"


def test_helpers_run_under_the_lock(m: Machine):
    with m.lock:
        assert m.valid_zones(m.block(32)) == "Normal Movable"
        assert m.device_online(m.block(32)) == 0
        assert m.device_offline(m.block(32)) == 0


def test_journaled_operations_take_the_lock_themselves(m: Machine):
    m.state_store(32, MMOP_ONLINE)
    assert m.block(32).state == "online"


def test_another_threads_hold_does_not_count(m: Machine):
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with m.lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(10)
        with pytest.raises(LockNotHeld):
            lockdep_assert_held(m.lock)
    finally:
        release.set()
        t.join(10)
