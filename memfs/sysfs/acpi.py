"""/sys/bus/acpi/devices/PNP0C80:NN: QEMU's DIMM slots as the ACPI memory driver shows them."""
from __future__ import annotations

import errno

from ..machine.hotplug import Machine
from .kernfs import Dir, DynDir, Link, Node, attr_ro, attr_wo
from .memory import acpi_devpath


def slot_dir(m: Machine, slot: int) -> DynDir:
    def dev():
        return m.slots[slot]

    def eject_store(buf: bytes) -> None:
        # acpi_eject_store(): only the first character counts; the eject itself is queued
        # work whose failure the writer never sees (it is reported to firmware via _OST).
        if buf[:1] != b"1":
            raise OSError(errno.EINVAL, "eject: write 1")
        d = dev()
        if d is None:
            raise OSError(errno.ENODEV, "slot is empty")
        if not m.cfg.acpi_memory_hotplug:  # no handler, no driver bound: acpi_eject_store() -ENODEV
            raise OSError(errno.ENODEV, "no driver handles this memory device")
        try:
            m.acpi_eject(d.id, source=0x103)
        except OSError:
            pass

    fixed: dict[str, Node] = {
        "status": attr_ro(lambda: "15\n" if dev() is not None else "0\n"),
        "path": attr_ro(lambda: f"\\_SB_.MHPC.MP{slot:02X}\n"),
        "hid": attr_ro(lambda: "PNP0C80\n"),
        "uid": attr_ro(lambda: f"{slot}\n"),
        "eject": attr_wo(eject_store),
    }

    def links() -> list[str]:
        d = dev()
        if d is None:
            return []
        return ["physical_node" if i == 0 else f"physical_node{i}" for i in range(len(d.block_ids))]

    def lookup(name: str) -> Node | None:
        hit = fixed.get(name)
        if hit is not None:
            return hit
        d = dev()
        if d is not None and name in links():
            i = 0 if name == "physical_node" else int(name[len("physical_node"):])
            return Link(f"../../../../system/memory/memory{d.block_ids[i]}")
        return None

    return DynDir(lambda: sorted(fixed) + links(), lookup)


def acpi_trees(m: Machine) -> tuple[Dir, Dir]:
    """(/sys/bus/acpi, /sys/devices/LNXSYSTM:00) for the machine's DIMM slots."""
    names = [f"PNP0C80:{i:02x}" for i in range(len(m.slots))]
    bus = Dir({"devices": Dir({n: Link(f"../../../devices/{acpi_devpath(i)}") for i, n in enumerate(names)})})
    pnp0a06 = Dir({n: slot_dir(m, i) for i, n in enumerate(names)})
    system = Dir({"LNXSYBUS:00": Dir({"PNP0A06:04": pnp0a06})})
    return bus, system
