"""``lockdep_assert_held()`` for the model (include/linux/lockdep.h).

``Machine.lock`` stands for the kernel's device-hotplug lock and ``mem_hotplug_lock``
together. The ``@journaled`` operations take it; the kernel-named helpers below them
(``memory_block_online``, ``zone_for_pfn_range``, ``add_memory``, ...) expect their caller
to hold it, as their kernel counterparts do, and check it here on every call: a helper
reached without the lock fails loudly instead of racing a concurrent writer.
"""
from __future__ import annotations

from typing import Protocol


class OwnedLock(Protocol):
    """A lock that knows its owner: ``threading.RLock`` (C and Python versions)."""

    def _is_owned(self) -> bool: ...


class LockNotHeld(AssertionError):
    """A helper that needs the hotplug lock was called without it (a memfs bug)."""


def lockdep_assert_held(lock: OwnedLock) -> None:
    """Raise LockNotHeld unless the calling thread holds ``lock`` (also under ``python -O``)."""
    if not lock._is_owned():
        raise LockNotHeld("the hotplug lock (Machine.lock) must be held here")
