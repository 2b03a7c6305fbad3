"""`memfs status`: a JSON snapshot of a Machine, and its text rendering.

`snapshot(machine)` is what the control channel's ``status`` op returns (and what
``memfs status --json`` prints); docs/cli.md documents its keys.
`render_text(snapshot)` only reads that dict, so the CLI can render a reply from a
daemon without the model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import __version__
from .sysfs.parse import bitmap_list  # no model import: status renders replies

if TYPE_CHECKING:  # the model's types only: the client renders replies without loading it
    from .machine.blocks import HotplugDevice, MemoryBlock
    from .machine.hotplug import Machine

SCHEMA = 1

#: the zone letters of the memory map (online blocks)
ZONE_CHAR = {"DMA": "D", "DMA32": "D", "Normal": "N", "Movable": "M", "Device": "V"}
MAP_WIDTH = 64

LEGEND = """\
legend: one character per memory block, 64 per line; the number before a line is its first block id
  D N M  online in ZONE_DMA/DMA32, ZONE_NORMAL, ZONE_MOVABLE (memmap in RAM)
  d n m  the same, with the block's memmap on the block itself (memmap_on_memory)
  X      online, pages in several zones (a boot block)
  .      offline (memmap in RAM)      :  offline, memmap on the block itself
  ~      going offline (an offline in progress, see offline_latency_ms)
  _      no memory block (a hole in the physical address space)
  |      boundary of a hot-plugged device (ACPI DIMM, virtio-mem, dax/kmem, probe)"""


def _block(m: "Machine", mem: "MemoryBlock") -> dict[str, Any]:
    if mem.zone is not None:
        zones = [mem.zone.name]
    else:
        node = m.nodes[mem.nid]
        zones = [node.zones[i].name for i in sorted(mem.boot_zone_pages)] if mem.state == "online" else []
    return {
        "id": mem.id,
        "start": mem.start_pfn << m.page_shift,
        "size": mem.nr_pages << m.page_shift,
        "state": mem.state,
        "online": not mem.dev_offline,
        "node": mem.nid,
        "nodes": list(mem.nids),
        "zones": zones,
        "valid_zones": m.valid_zones(mem),
        "device": mem.device.id if mem.device is not None else None,
        "boot": mem.boot,
        "memmap_on_memory": mem.nr_vmemmap_pages > 0,
        "vmemmap_pages": mem.nr_vmemmap_pages,
        "present_pages": mem.present_pages,
        "reserved_pages": mem.reserved,
        "unmovable_pages": mem.unmovable,
        "movable_pages": mem.movable,
        "hwpoison_pages": mem.hwpoison,
        "free_pages": mem.free if mem.state == "online" else 0,
    }


def device_dict(m: "Machine", dev: "HotplugDevice") -> dict[str, Any]:
    return {
        "id": dev.id,
        "driver": dev.driver,
        "start": dev.start,
        "size": dev.size,
        "range": f"0x{dev.start:016x}-0x{dev.start + dev.size - 1:016x}",
        "node": dev.nid,
        "slot": dev.slot,
        "blocks": list(dev.block_ids),
        "memmap_on_memory": bool(dev.memmap_on_memory),
        # virtio-mem: size is the region; requested follows the hypervisor, plugged the driver
        "requested": dev.requested if dev.driver == "virtio_mem" else dev.size,
        "plugged": len(dev.block_ids) * m.block_size,
    }


def snapshot(m: "Machine", **extra: Any) -> dict[str, Any]:
    """Everything `memfs status` shows, taken under the hotplug lock."""
    with m.lock:
        nodes = []
        for nid in sorted(m.nodes):
            node = m.nodes[nid]
            start, spanned = node.span()
            mi = m.meminfo(nid)
            nodes.append({
                "id": nid,
                "online": node.online,
                "cpus": node.cpus,
                "start_pfn": start,
                "spanned": spanned,
                "present": node.present,
                "managed": node.managed,
                "MemTotal": mi["MemTotal"],
                "MemFree": mi["MemFree"],
                "blocks": sorted(node.blocks),
                "zones": [{
                    "name": z.name,
                    "start_pfn": z.start_pfn,
                    "spanned": z.spanned,
                    "present": z.present,
                    "managed": z.managed,
                    "vmemmap": z.vmemmap,
                    "used": z.used,
                    "free": z.free,
                    "pcp": z.free - z.nr_free_pages,
                } for z in node.zones],
            })
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "version": __version__,
            **extra,
            "kernel": m.profile.name,
            "arch": m.arch.name,
            "page_size": m.page_size,
            "block_size": m.block_size,
            "auto_online_blocks": m.auto_online_blocks,
            "memmap_on_memory": m.memmap_on_memory,
            "online_policy": m.online_policy,
            "generation": m.generation,
            "seqnum": m.events.seqnum,
            "meminfo": m.meminfo(),
            "hotplug": {"base": m.cfg.hotplug_base, "size": m.cfg.hotplug_size,
                        "slots": len(m.slots), "slots_used": sum(1 for d in m.slots if d is not None)},
            "nodes": nodes,
            "blocks": [_block(m, m.blocks[b]) for b in m.block_ids()],
            "devices": [device_dict(m, d) for d in sorted(m.devices.values(), key=lambda d: d.start)],
            "allocations": [a.to_dict() for a in sorted(m.allocator.allocs.values(), key=lambda a: a.id)],
        }
    return out


# ---------------------------------------------------------------------- text

def human_size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def id_ranges(ids: list[int]) -> str:
    """[32, 34, 35, 36] -> "32,34-36"; "-" for none."""
    return bitmap_list(ids) or "-"


def block_char(b: dict[str, Any]) -> str:
    if b["state"] == "online":
        zones = b["zones"]
        c = ZONE_CHAR.get(zones[0], "?") if len(zones) == 1 else "X"
        return c.lower() if b["memmap_on_memory"] else c
    if b["state"] == "offline":
        return ":" if b["memmap_on_memory"] else "."
    return "~"  # going-offline: only visible mid-operation


def memory_map(s: dict[str, Any], width: int = MAP_WIDTH) -> list[str]:
    """The map lines (without legend): `<first id> <chars>`, runs of empty lines folded."""
    blocks = {b["id"]: b for b in s["blocks"]}
    if not blocks:
        return ["(no memory blocks)"]
    last = max(blocks)
    lines: list[str] = []
    folded: list[int] = []  # first ids of consecutive rows without any block

    def flush_folded() -> None:
        if folded:
            a, b = folded[0], min(folded[-1] + width - 1, last)
            lines.append(f"{'':>6}  ({b - a + 1} blocks {a}-{b}: no memory)")
            folded.clear()

    def dev(i: int) -> str | None:
        b = blocks.get(i)
        return b["device"] if b is not None else None

    for row in range(0, last + 1, width):
        ids = range(row, min(row + width, last + 1))
        if not any(i in blocks for i in ids) and not any(dev(i - 1) for i in ids):
            folded.append(row)
            continue
        flush_folded()
        chars = []
        for i in ids:
            if i > 0 and dev(i) != dev(i - 1) and (dev(i) or dev(i - 1)):
                chars.append("|")
            b = blocks.get(i)
            chars.append(block_char(b) if b is not None else "_")
        if ids[-1] == last and dev(last):
            chars.append("|")
        lines.append(f"{row:>6}  {''.join(chars)}")
    flush_folded()
    return lines


def _fmt_pfn(z: dict[str, Any]) -> str:
    return f"{z['start_pfn']:#x}" if z["spanned"] else "-"


def render_text(s: dict[str, Any]) -> str:
    bs = s["block_size"]
    blocks = s["blocks"]
    n_on = sum(1 for b in blocks if b["state"] == "online")
    out = []
    where = f" at {s['mountpoint']}" if s.get("mountpoint") else ""
    pid = f" (daemon pid {s['pid']})" if s.get("pid") else ""
    out.append(f"memfs{where}{pid}: kernel {s['kernel']}, {s['arch']}, "
               f"{human_size(bs)} blocks, auto_online_blocks={s['auto_online_blocks']}, "
               f"memmap_on_memory={str(s['memmap_on_memory']).lower()}")
    if s.get("state_file"):
        out.append(f"state file: {s['state_file']} (every change is saved there; the next mount with it resumes)")
    sb = s.get("sandbox")
    if sb:
        out.append(f"sandbox: running (holder pid {sb['holder']}; memfs exec/udevd work)" if sb["running"]
                   else f"sandbox: none ({sb['error'] or 'starting'})")
    mi = s["meminfo"]
    out.append(f"MemTotal: {mi['MemTotal']:>12} kB   MemFree: {mi['MemFree']:>12} kB   "
               f"blocks: {len(blocks)} ({n_on} online, {len(blocks) - n_on} offline)")
    out.append("")
    for n in s["nodes"]:
        state = "online" if n["online"] else "offline"
        out.append(f"node {n['id']} ({state}): start_pfn {n['start_pfn']:#x}, spanned {n['spanned']}, "
                   f"present {n['present']}, managed {n['managed']}, "
                   f"MemTotal {n['MemTotal']} kB, MemFree {n['MemFree']} kB")
        out.append(f"  {'zone':<8}{'start_pfn':>12}{'spanned':>10}{'present':>10}{'managed':>10}"
                   f"{'vmemmap':>9}{'free':>10}")
        for z in n["zones"]:
            if z["name"] == "Device" and not z["spanned"]:
                continue
            out.append(f"  {z['name']:<8}{_fmt_pfn(z):>12}{z['spanned']:>10}{z['present']:>10}"
                       f"{z['managed']:>10}{z['vmemmap']:>9}{z['free']:>10}")
    out.append("")
    hp = s["hotplug"]
    out.append(f"devices ({hp['slots_used']} of {hp['slots']} DIMM slots used):")
    if s["devices"]:
        w = max(4, *(len(d["id"]) for d in s["devices"])) + 2
        out.append(f"  {'id':<{w}}{'driver':<12}{'range':<38}{'size':>6}{'node':>6}{'slot':>6}"
                   f"  {'blocks':<12}memmap_on_memory")
        for d in s["devices"]:
            slot = "-" if d["slot"] is None else str(d["slot"])
            out.append(f"  {d['id']:<{w}}{d['driver']:<12}{d['range']:<38}{human_size(d['size']):>6}"
                       f"{d['node']:>6}{slot:>6}  {id_ranges(d['blocks']):<12}"
                       f"{'yes' if d['memmap_on_memory'] else 'no'}"
                       + (f"  (virtio-mem: requested {human_size(d['requested'])}, plugged "
                          f"{human_size(d['plugged'])})" if d["driver"] == "virtio_mem" else ""))
    else:
        out.append("  (none)")
    user = [a for a in s["allocations"] if a["label"] == "user"]
    if user:
        out.append("")
        out.append("allocations (memfs alloc):")
        for a in user:
            where_ = ", ".join(f"memory{b}: {n}" for b, n in a["blocks"].items())
            out.append(f"  {a['id']:>4}  {a['kind']:<10}{a['pages']:>9} pages  ({where_})")
    out.append("")
    out.append(f"memory map ({human_size(bs)} per character):")
    out.extend(memory_map(s))
    out.append(LEGEND)
    return "\n".join(out) + "\n"
