"""/proc/meminfo, /proc/zoneinfo, /proc/vmstat and nodeN/meminfo in the kernel's formats.

Hotplug-relevant numbers come from the model (MemTotal, MemFree, MemUsed, zone spans,
present, managed, free, HardwareCorrupted, nr_memmap*). The rest of each file is the
reference VM's boot-time background (page cache, slab, ...), held constant, so parsers
see every line they expect. Field widths are copied from a real 6.1 kernel's output.
"""
from __future__ import annotations

from ..machine.hotplug import Machine
from ..machine.zones import Zone

# (label, value width, has " kB") of drivers/base/node.c node_read_meminfo(), 6.1
_NODE_FIELDS = (
    ("MemTotal:", 15), ("MemFree:", 16), ("MemUsed:", 16), ("SwapCached:", 13), ("Active:", 17),
    ("Inactive:", 15), ("Active(anon):", 11), ("Inactive(anon):", 9), ("Active(file):", 11),
    ("Inactive(file):", 9), ("Unevictable:", 12), ("Mlocked:", 16), ("Dirty:", 18), ("Writeback:", 14),
    ("FilePages:", 14), ("Mapped:", 17), ("AnonPages:", 14), ("Shmem:", 18), ("KernelStack:", 12),
    ("PageTables:", 13), ("SecPageTables:", 10), ("NFS_Unstable:", 11), ("Bounce:", 17),
    ("WritebackTmp:", 11), ("KReclaimable:", 11), ("Slab:", 19), ("SReclaimable:", 11),
    ("SUnreclaim:", 13), ("AnonHugePages:", 10), ("ShmemHugePages:", 9), ("ShmemPmdMapped:", 9),
    ("FileHugePages:", 9), ("FilePmdMapped:", 9),
)
_NODE_HUGE = (("HugePages_Total:", 6), ("HugePages_Free:", 7), ("HugePages_Surp:", 7))
_NODE_BACKGROUND = {
    "Active:": 1832, "Inactive:": 304, "Active(anon):": 1832, "Inactive(anon):": 304, "FilePages:": 1972,
    "Mapped:": 1796, "AnonPages:": 192, "Shmem:": 1972, "KernelStack:": 768, "PageTables:": 72,
    "KReclaimable:": 8980, "Slab:": 15544, "SReclaimable:": 8980, "SUnreclaim:": 6564,
}

# fs/proc/meminfo.c, 6.1: (label, has " kB")
_MEMINFO_FIELDS = (
    "MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached", "SwapCached", "Active", "Inactive",
    "Active(anon)", "Inactive(anon)", "Active(file)", "Inactive(file)", "Unevictable", "Mlocked",
    "SwapTotal", "SwapFree", "Zswap", "Zswapped", "Dirty", "Writeback", "AnonPages", "Mapped", "Shmem",
    "KReclaimable", "Slab", "SReclaimable", "SUnreclaim", "KernelStack", "PageTables", "SecPageTables",
    "NFS_Unstable", "Bounce", "WritebackTmp", "CommitLimit", "Committed_AS", "VmallocTotal",
    "VmallocUsed", "VmallocChunk", "Percpu", "HardwareCorrupted", "AnonHugePages", "ShmemHugePages",
    "ShmemPmdMapped", "FileHugePages", "FilePmdMapped", "HugePages_Total", "HugePages_Free",
    "HugePages_Rsvd", "HugePages_Surp", "Hugepagesize", "Hugetlb", "DirectMap4k", "DirectMap2M",
    "DirectMap1G",
)
_NO_KB = {"HugePages_Total", "HugePages_Free", "HugePages_Rsvd", "HugePages_Surp"}
_MEMINFO_BACKGROUND = {
    "Cached": 1972, "Active": 1832, "Inactive": 308, "Active(anon)": 1832, "Inactive(anon)": 308,
    "AnonPages": 216, "Mapped": 1792, "Shmem": 1972, "KReclaimable": 9032, "Slab": 15604,
    "SReclaimable": 9032, "SUnreclaim": 6572, "KernelStack": 768, "PageTables": 76,
    "Committed_AS": 2996, "VmallocTotal": 13743895347199, "VmallocUsed": 7384, "Percpu": 260,
    "Hugepagesize": 2048, "DirectMap4k": 26496, "DirectMap2M": 2332672,
}


def node_meminfo(m: Machine, nid: int) -> str:
    with m.lock:
        mi = m.meminfo(nid)
    vals = dict(_NODE_BACKGROUND, **{"MemTotal:": mi["MemTotal"], "MemFree:": mi["MemFree"],
                                     "MemUsed:": mi["MemUsed"]})
    lines = [f"Node {nid} {label}{vals.get(label, 0):>{w}} kB" for label, w in _NODE_FIELDS]
    lines += [f"Node {nid} {label}{0:>{w}}" for label, w in _NODE_HUGE]
    return "\n".join(lines) + "\n"


def meminfo(m: Machine) -> str:
    with m.lock:
        mi = m.meminfo()
    vals = dict(_MEMINFO_BACKGROUND)
    vals.update(MemTotal=mi["MemTotal"], MemFree=mi["MemFree"], MemAvailable=mi["MemFree"],
                HardwareCorrupted=mi["HardwareCorrupted"], CommitLimit=mi["MemTotal"] // 2)
    out = []
    for label in _MEMINFO_FIELDS:
        tail = "" if label in _NO_KB else " kB"
        if label == "HardwareCorrupted":  # its own seq_printf: "HardwareCorrupted: %5lu kB"
            out.append(f"{label}: {vals.get(label, 0):>5}{tail}")
            continue
        out.append(f"{label + ':':<16}{vals.get(label, 0):>8}{tail}")
    return "\n".join(out) + "\n"


def watermarks(m: Machine, zone: Zone) -> tuple[int, int, int]:
    """__setup_per_zone_wmarks() with THP's recommended min_free_kbytes (approximation)."""
    if not zone.managed:
        return 0, 0, 0
    lowmem = sum(z.managed for n in m.nodes.values() for z in n.zones if z.is_kernel) or 1
    populated = sum(1 for n in m.nodes.values() for z in n.zones if z.populated())
    min_pages = min(m.arch.pageblock_pages * populated * 11, lowmem * 5 // 100)
    if zone.is_movable:
        wmin = max(32, min(zone.managed // 1024, 128))
    else:
        wmin = min_pages * zone.managed // lowmem
    tmp = max(wmin // 4, zone.managed * 10 // 10000)
    return wmin, wmin + tmp, wmin + 2 * tmp


def zoneinfo(m: Machine) -> str:
    out: list[str] = []
    with m.lock:
        for nid in sorted(m.nodes):
            node = m.nodes[nid]
            if not node.online:
                continue
            first_populated = next((z for z in node.zones if z.populated()), None)
            nzones = len(node.zones)
            for zone in node.zones:
                out.append(f"Node {nid}, zone {zone.name:>8}")
                if zone is first_populated:
                    out.append("  per-node stats")
                    out += [f"      {k:<12} {v}" for k, v in _node_stats(m, nid)]
                wmin, low, high = watermarks(m, zone)
                free = zone.nr_free_pages if zone.populated() else 0
                out.append(f"  pages free     {free}")
                out += ["        boost    0", f"        min      {wmin}", f"        low      {low}",
                        f"        high     {high}", f"        spanned  {zone.spanned}",
                        f"        present  {zone.present}", f"        managed  {zone.managed}",
                        f"        cma      {zone.cma}"]
                out.append("        protection: (" + ", ".join(["0"] * nzones) + ")")
                if not zone.populated():
                    continue
                out.append(f"      {'nr_free_pages':<12} {free}")
                for k in ("nr_zone_inactive_anon", "nr_zone_active_anon", "nr_zone_inactive_file",
                          "nr_zone_active_file", "nr_zone_unevictable", "nr_zone_write_pending",
                          "nr_mlock", "nr_bounce", "nr_zspages", "nr_free_cma"):
                    out.append(f"      {k:<12} 0")
                out += ["  pagesets", "    cpu: 0", f"              count: {m.pcp_count(zone)}", f"              high:  {low}",
                        "              batch: 1", "  vm stats threshold: 2", "  node_unreclaimable:  0",
                        f"  start_pfn:           {zone.start_pfn}"]
    return "\n".join(out) + "\n"


def _node_stats(m: Machine, nid: int) -> list[tuple[str, int]]:
    return [("nr_inactive_anon", 77), ("nr_active_anon", 458), ("nr_inactive_file", 0),
            ("nr_active_file", 0), ("nr_unevictable", 0), ("nr_slab_reclaimable", 2258),
            ("nr_slab_unreclaimable", 1643), ("nr_anon_pages", 45), ("nr_mapped", 448),
            ("nr_file_pages", 493), ("nr_dirty", 0), ("nr_writeback", 0), ("nr_shmem", 493),
            ("nr_kernel_stack", 768), ("nr_page_table_pages", 19)]


def node_vmstat(m: Machine, nid: int) -> str:
    """drivers/base/node.c node_read_vmstat() (6.1): zone counters summed over the node's
    zones, the NUMA events, then the node counters. nr_free_pages, nr_free_cma are the
    model's; the background counters belong to the lowest node with memory (where the
    reference VM's kernel and page cache live), the NUMA events are 0 (no allocator)."""
    with m.lock:
        node = m.nodes[nid]
        zones = [z for z in node.zones if z.populated()]
        free = sum(z.free for z in zones)
        home = min((n for n, x in m.nodes.items() if x.has_memory()), default=None) == nid
        bg = 1 if home else 0
        lines = [("nr_free_pages", free), ("nr_zone_inactive_anon", 77 * bg), ("nr_zone_active_anon", 458 * bg),
                 ("nr_zone_inactive_file", 0), ("nr_zone_active_file", 0), ("nr_zone_unevictable", 0),
                 ("nr_zone_write_pending", 0), ("nr_mlock", 0), ("nr_bounce", 0), ("nr_zspages", 0),
                 ("nr_free_cma", sum(min(z.cma, z.free) for z in zones))]
        lines += [(k, 0) for k in ("numa_hit", "numa_miss", "numa_foreign", "numa_interleave", "numa_local",
                                   "numa_other")]
        lines += [(k, v * bg) for k, v in _node_stats(m, nid)]
    return "".join(f"{k} {v}\n" for k, v in lines)


def vmstat(m: Machine) -> str:
    with m.lock:
        zones = [z for n in m.nodes.values() for z in n.zones]
        free = sum(z.nr_free_pages for z in zones if z.populated())
        lines = [("nr_free_pages", free), ("nr_zone_inactive_anon", 77), ("nr_zone_active_anon", 458),
                 ("nr_zone_inactive_file", 0), ("nr_zone_active_file", 0), ("nr_zone_unevictable", 0),
                 ("nr_zone_write_pending", 0), ("nr_mlock", 0), ("nr_bounce", 0), ("nr_zspages", 0),
                 ("nr_free_cma", 0), ("nr_inactive_anon", 77), ("nr_active_anon", 458),
                 ("nr_slab_reclaimable", 2258), ("nr_slab_unreclaimable", 1643), ("nr_kernel_stack", 768),
                 ("nr_page_table_pages", 19)]
        if m.profile.vmstat_memmap:
            lines += [("nr_memmap_pages", m.nr_memmap_pages), ("nr_memmap_boot_pages", m.nr_memmap_boot_pages)]
    return "".join(f"{k} {v}\n" for k, v in lines)
