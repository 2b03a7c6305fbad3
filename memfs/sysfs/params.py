"""/sys/module/memory_hotplug/parameters: the module parameters of mm/memory_hotplug.c."""
from __future__ import annotations

import errno

from ..machine.hotplug import Machine
from .kernfs import Dir, Node, attr_ro, attr_rw
from .parse import kstrtobool, kstrtouint, sysfs_match_string


def params_dir(m: Machine) -> Dir | None:
    """None for profiles without any parameter (5.12): the directory does not exist."""
    p = m.profile
    entries: dict[str, Node] = {}
    if p.memmap_on_memory:
        def mmom_show() -> str:
            v = m.memmap_on_memory
            return "force\n" if v == "force" else ("Y\n" if v else "N\n")
        entries["memmap_on_memory"] = attr_ro(mmom_show)  # 0444: boot-time only
    if p.online_policy:
        def policy_store(buf: bytes) -> None:
            i = sysfs_match_string(("contig-zones", "auto-movable"), buf)
            if i < 0:
                raise OSError(errno.EINVAL, "online_policy: contig-zones or auto-movable")
            m.set_param("online_policy", ("contig-zones", "auto-movable")[i])

        entries["online_policy"] = attr_rw(lambda: m.online_policy + "\n", policy_store)
        entries["auto_movable_ratio"] = attr_rw(
            lambda: f"{m.auto_movable_ratio}\n",
            lambda buf: m.set_param("auto_movable_ratio", kstrtouint(buf, 0)))
        entries["auto_movable_numa_aware"] = attr_rw(
            lambda: "Y\n" if m.auto_movable_numa_aware else "N\n",
            lambda buf: m.set_param("auto_movable_numa_aware", kstrtobool(buf, p.name)))
    return Dir(dict(sorted(entries.items()))) if entries else None
