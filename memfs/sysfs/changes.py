"""What each change of a Machine did to its sysfs tree, for the FUSE adapter's caches.

The model reports changes in two ways, both under its lock: ``Machine.listeners``
after every change of its state (``_changed()``), and the uevents of its devices
(``Machine.events``: ``add``/``remove``/``online``/``offline`` of ``memoryN``, which
drivers/base/memory.c emits for every block that appears, vanishes or changes state).
:func:`watch_machine` turns them into :class:`~memfs.sysfs.kernfs.Change` reports:
which block's attributes may show new text (its ``Attr.owner``, see memory.py),
which blocks are gone, which paths appeared or vanished, and that the GLOBAL-scoped
texts (/proc, node, parameter files, offline blocks' valid_zones) may have changed.
"""
from __future__ import annotations

from typing import Callable

from ..machine.blocks import MemoryBlock
from ..machine.events import Uevent
from ..machine.hotplug import Machine
from .kernfs import Change
from .memory import acpi_devpath, block_owner

_BLOCK_DEVPATH = "/devices/system/memory/memory"


def block_entries(mem: MemoryBlock) -> list[str]:
    """Every path that exists because block ``mem`` exists (its directory and the links to it)."""
    name = mem.name
    out = [f"/sys/devices/system/memory/{name}", f"/sys/bus/memory/devices/{name}"]
    out += [f"/sys/devices/system/node/node{nid}/{name}" for nid in mem.nids]
    dev = mem.device
    if dev is not None and dev.slot is not None and mem.id in dev.block_ids:
        i = dev.block_ids.index(mem.id)
        out.append(f"/sys/devices/{acpi_devpath(dev.slot)}/" + ("physical_node" if i == 0 else f"physical_node{i}"))
    return out


def watch_machine(m: Machine, report: Callable[[Change], object]) -> None:
    """Call ``report(Change)`` for every change of ``m`` from now on (under ``m.lock``)."""
    with m.lock:
        blocks = dict(m.blocks)  # removed blocks are gone from m.blocks when reported
        online = {nid for nid, n in m.nodes.items() if n.online}

    def on_event(ev: Uevent) -> None:
        if not ev.devpath.startswith(_BLOCK_DEVPATH):
            return
        bid = int(ev.devpath[len(_BLOCK_DEVPATH):])
        if ev.action == "add":
            mem = blocks[bid] = m.blocks[bid]
            report(Change(owners=(block_owner(bid),), entries=block_entries(mem)))
        elif ev.action == "remove":
            gone = blocks.pop(bid, None)
            report(Change(removed=(block_owner(bid),),
                          entries=block_entries(gone) if gone is not None else None))
        else:  # online, offline, change (a synthetic uevent changes nothing shown)
            report(Change(owners=(block_owner(bid),)))

    def on_changed() -> None:
        now = {nid for nid, n in m.nodes.items() if n.online}
        flipped = now ^ online
        online.clear()
        online.update(now)
        report(Change(entries=[p for nid in sorted(flipped) for p in (f"/sys/devices/system/node/node{nid}",
                                                                      f"/sys/bus/node/devices/node{nid}")],
                      everything=True))

    m.events.subscribe(on_event)
    m.listeners.append(on_changed)
