"""``memfs describe``: read a machine's memory sysfs (live, or a dump) and write a machine
description that ``memfs mount --config`` turns back into the same tree.

Only reads: files are opened O_RDONLY, links read with readlink(2), directories listed;
nothing is created, written or locked anywhere but the output file (the CLI opens that).

What a sysroot tells, and where from (kernel 6.x paths, drivers/base/memory.c, node.c,
mm/memory_hotplug.c, kernel/resource.c, drivers/firmware/memmap.c):

- ``sys/devices/system/memory``: block_size_bytes, auto_online_blocks, probe, and per
  block ``state``, ``valid_zones`` (the zone of an online block), ``removable``,
  ``nodeN`` links, ``firmware_node`` (an ACPI memory device: PNP0C80, with its slot).
- ``sys/devices/system/node``: possible, online, has_cpu.
- ``sys/module/memory_hotplug/parameters``: memmap_on_memory, online_policy, auto_movable_*.
- ``proc/iomem``: "System RAM" (boot and ACPI/probe memory), "System RAM (kmem)" (dax/kmem),
  "System RAM (virtio_mem)"; ``sys/firmware/memmap``: the firmware's map (boot RAM, and
  memory hot-added by ACPI or probe; dax/kmem and virtio-mem add none: MHP_NO_FIRMWARE_MEMMAP).
- ``proc/zoneinfo`` (present/managed per zone) and ``nodeN/meminfo`` (MemUsed): how much boot
  memory the kernel keeps and uses.
- ``proc/sys/kernel/osrelease``, ``proc/sys/kernel/arch``, ``proc/cmdline``: kernel profile,
  arch, ``movable_node``.

The numbers the sysroot does not give directly (reserved and used boot memory per node)
are calibrated: the description is booted in memfs's model and compared with the dump's
zoneinfo and node meminfo. The finished description is booted once more and every memory
block attribute compared with the dump; differences are listed in the file and returned.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .machine.config import ConfigError, from_dict
from .machine.hotplug import Machine
from .machine.profiles import ARCHES, PROFILES, GiB, resolve_kernel
from .sysfs.parse import bitmap_list
from .sysfs.tree import build_tree

MEMORY = "sys/devices/system/memory"
NODE = "sys/devices/system/node"
PARAMS = "sys/module/memory_hotplug/parameters"
BLOCK_FILES = ("state", "online", "valid_zones", "removable", "phys_index", "phys_device")


class DescribeError(Exception):
    """The directory is not a memory sysroot (or cannot be read)."""


@dataclass
class Block:
    id: int
    state: str
    online: str | None
    valid_zones: str | None
    removable: str | None
    nodes: list[int]
    acpi_slot: int | None  # firmware_node -> .../PNP0C80:NN
    files: dict[str, str] = field(default_factory=dict)  # attribute -> text, as read


@dataclass
class Dump:
    root: Path
    block_size: int
    blocks: dict[int, Block]
    auto_online_blocks: str | None
    probe: bool
    params: dict[str, str]
    possible_nodes: list[int] | None
    has_cpu: list[int] | None
    node_used_kb: dict[int, int]  # nodeN/meminfo MemUsed
    node_cpulist: dict[int, str]  # nodeN/cpulist
    node_distance: dict[int, list[int]]  # nodeN/distance
    zones: dict[int, list[dict[str, int]]]  # proc/zoneinfo: per node, each zone's numbers

    @property
    def zone_managed(self) -> dict[int, int]:
        """Per node, the sum of its zones' managed pages."""
        return {nid: sum(z.get("managed", 0) for z in zs) for nid, zs in self.zones.items()}
    iomem: list[tuple[int, int, str, int]]  # (start, end exclusive, name, depth)
    firmware_ram: list[tuple[int, int]]  # firmware memmap "System RAM", end exclusive
    release: str | None
    arch: str | None
    cmdline: str | None
    acpi_slots: int  # PNP0C80 devices present on the ACPI bus


# ---------------------------------------------------------------------- reading

def _read(path: Path) -> str | None:
    """A sysfs file's text, or None when it is missing or unreadable (write-only files)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        chunks = []
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def parse_list(text: str | None) -> list[int] | None:
    """A "%*pbl" list: "0-2,5" -> [0, 1, 2, 5]; None for a missing file."""
    if text is None:
        return None
    ids: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        a, _, b = part.partition("-")
        ids.extend(range(int(a), int(b or a) + 1))
    return ids


def _iomem(text: str | None) -> list[tuple[int, int, str, int]]:
    out = []
    for line in (text or "").splitlines():
        m = re.match(r"^(\s*)([0-9a-fA-F]+)-([0-9a-fA-F]+) : (.*)$", line)
        if m:
            out.append((int(m.group(2), 16), int(m.group(3), 16) + 1, m.group(4).strip(), len(m.group(1)) // 2))
    if out and all(s == 0 and e == 1 for s, e, _, _ in out):
        return []  # read without CAP_SYS_ADMIN: every address shows as 0
    return out


def _zoneinfo(text: str | None) -> dict[int, list[dict[str, int]]]:
    """Per node, its zones' spanned/present/managed/start_pfn (mm/vmstat.c zoneinfo_show())."""
    zones: dict[int, list[dict[str, int]]] = {}
    cur: dict[str, int] | None = None
    for line in (text or "").splitlines():
        m = re.match(r"^Node (\d+), zone\s+\S+", line)
        if m:
            cur = {}
            zones.setdefault(int(m.group(1)), []).append(cur)
            continue
        m = re.match(r"^\s+(spanned|present|managed)\s+(\d+)$", line) or re.match(r"^\s+(start_pfn):\s+(\d+)$", line)
        if m and cur is not None:
            cur[m.group(1)] = int(m.group(2))
    return zones


def read_dump(root: str | os.PathLike[str]) -> Dump:
    """Everything describe needs from a sysroot ("/" for the live machine)."""
    root = Path(root)
    mem = root / MEMORY
    bs_text = _read(mem / "block_size_bytes")
    if bs_text is None:
        raise DescribeError(f"{mem}/block_size_bytes is missing: {root} is not a sysroot with memory "
                            f"blocks (expected {MEMORY}/memoryN, as /sys or a dump of it)")
    try:
        block_size = int(bs_text.strip(), 16)
    except ValueError:
        raise DescribeError(f"{mem}/block_size_bytes: not a hex number: {bs_text.strip()!r}") from None
    blocks: dict[int, Block] = {}
    for name in _listdir(mem):
        m = re.fullmatch(r"memory(\d+)", name)
        if not m:
            continue
        d = mem / name
        files = {f: t for f in BLOCK_FILES if (t := _read(d / f)) is not None}
        state = files.get("state", "").strip()
        if not state:
            continue
        entries = _listdir(d)
        nodes = sorted(int(e[4:]) for e in entries if re.fullmatch(r"node\d+", e))
        slot = None
        try:
            target = os.readlink(d / "firmware_node")
            sm = re.search(r"PNP0C80:([0-9a-fA-F]+)$", target)
            slot = int(sm.group(1), 16) if sm else None
        except OSError:
            pass
        vz = files.get("valid_zones")
        blocks[int(m.group(1))] = Block(int(m.group(1)), state, files.get("online", "").strip() or None,
                                        vz.strip() if vz is not None else None,
                                        files.get("removable", "").strip() or None, nodes, slot, files)
    if not blocks:
        raise DescribeError(f"{mem} has no memoryN directories")
    params = {p: t.strip() for p in _listdir(root / PARAMS) if (t := _read(root / PARAMS / p)) is not None}
    used: dict[int, int] = {}
    cpulist: dict[int, str] = {}
    distance: dict[int, list[int]] = {}
    node_dir = root / NODE
    for name in _listdir(node_dir):
        if re.fullmatch(r"node\d+", name):
            nid = int(name[4:])
            mi = _read(node_dir / name / "meminfo") or ""
            m = re.search(r"MemUsed:\s+(\d+) kB", mi)
            if m:
                used[nid] = int(m.group(1))
            cl = _read(node_dir / name / "cpulist")
            if cl is not None:
                cpulist[nid] = cl.strip()
            dist = (_read(node_dir / name / "distance") or "").split()
            if dist and all(x.isdigit() for x in dist):
                distance[nid] = [int(x) for x in dist]
    firmware: list[tuple[int, int]] = []
    fw = root / "sys/firmware/memmap"
    for e in _listdir(fw):
        typ = (_read(fw / e / "type") or "").strip()
        if typ == "System RAM":
            try:
                firmware.append((int((_read(fw / e / "start") or "").strip(), 16),
                                 int((_read(fw / e / "end") or "").strip(), 16) + 1))
            except ValueError:
                continue
    acpi = [n for n in _listdir(root / "sys/bus/acpi/devices") if n.startswith("PNP0C80:")]

    def text(rel: str) -> str | None:
        t = _read(root / rel)
        return t.strip() if t is not None else None

    return Dump(root=root, block_size=block_size, blocks=blocks,
                auto_online_blocks=text(f"{MEMORY}/auto_online_blocks"),
                probe=os.path.lexists(mem / "probe"), params=params,
                possible_nodes=parse_list(_read(node_dir / "possible")),
                has_cpu=parse_list(_read(node_dir / "has_cpu")),
                node_used_kb=used, node_cpulist=cpulist, node_distance=distance,
                zones=_zoneinfo(_read(root / "proc/zoneinfo")),
                iomem=_iomem(_read(root / "proc/iomem")), firmware_ram=sorted(firmware),
                release=text("proc/sys/kernel/osrelease"), arch=text("proc/sys/kernel/arch"),
                cmdline=text("proc/cmdline"), acpi_slots=len(acpi))


# ---------------------------------------------------------------------- deciding

def profile_for_release(release: str) -> tuple[str, str | None]:
    """The profile for a kernel release (machine.profiles.resolve_kernel: the newest profile
    not newer than MAJOR.MINOR); a release older than every profile gets the oldest, and
    says so instead of refusing: the dump's blocks are still worth reproducing."""
    try:
        return resolve_kernel(release)
    except ValueError:
        if not re.match(r"^v?\d+\.\d+", release.strip()):
            raise DescribeError(f"kernel release {release!r} does not start with MAJOR.MINOR; give --kernel") from None
    oldest = min(PROFILES, key=lambda n: tuple(int(x) for x in n.split(".")))
    return oldest, (f"{release} is older than memfs's oldest profile ({oldest}): behaviour that changed "
                    f"before {oldest} is {oldest}'s here (e.g. `removable` is computed per block "
                    f"before 5.7; memfs always shows 1)")


def _arch(dump: Dump, live: bool, page_size: int | None) -> tuple[str, str | None]:
    machine = dump.arch or (os.uname().machine if live else None)
    if machine is None:
        return "x86_64", "the dump has no proc/sys/kernel/arch: x86_64 assumed"
    if machine == "x86_64":
        return "x86_64", None
    if machine in ("aarch64", "arm64"):
        ps = page_size or 4096
        name = {4096: "arm64-4k", 16384: "arm64-16k", 65536: "arm64-64k"}.get(ps)
        if name is None:
            raise DescribeError(f"arm64 with {ps}-byte pages: memfs models 4k, 16k and 64k pages")
        return name, None
    raise DescribeError(f"the machine is {machine}; memfs models x86_64 and arm64 only "
                        f"({', '.join(ARCHES)})")


def _guess_page_size(dump: Dump) -> int | None:
    """The page size a dump's zoneinfo implies: its present pages must fit in the online
    blocks and fill more than a quarter of them (holes are never that large), which only one
    of 4K, 16K and 64K does."""
    present = sum(z.get("present", 0) for zones in dump.zones.values() for z in zones)
    room = sum(1 for b in dump.blocks.values() if b.state == "online") * dump.block_size
    if not present or not room:
        return None
    fits = [ps for ps in (4096, 16384, 65536) if present * ps <= room < present * ps * 4]
    return fits[0] if len(fits) == 1 else None


@dataclass
class Device:
    id: str
    driver: str
    start: int
    size: int
    node: int
    blocks: list[int]


def _devices(dump: Dump, bs: int) -> list[Device]:
    """Hot-plugged memory the sysroot can tell apart from boot memory."""
    devs: list[Device] = []
    by_slot: dict[int, list[int]] = {}
    for b in sorted(dump.blocks.values(), key=lambda b: b.id):
        if b.acpi_slot is not None:
            by_slot.setdefault(b.acpi_slot, []).append(b.id)
    for slot in sorted(by_slot):
        ids = by_slot[slot]
        devs.append(Device(f"dimm{slot + 1}", "acpi", ids[0] * bs, len(ids) * bs,
                           (dump.blocks[ids[0]].nodes or [0])[0], ids))
    taken = {b for d in devs for b in d.blocks}
    for drv, label in (("dax_kmem", "System RAM (kmem)"), ("virtio_mem", "System RAM (virtio_mem)")):
        ids = sorted({bid for s, e, name, _ in dump.iomem if name == label
                      for bid in range(s // bs, (e - 1) // bs + 1) if bid in dump.blocks and bid not in taken})
        run: list[int] = []
        for bid in [*ids, None]:
            if run and (bid is None or bid != run[-1] + 1
                        or dump.blocks[bid].nodes != dump.blocks[run[0]].nodes):
                n = sum(1 for d in devs if d.driver == drv) + 1
                devs.append(Device(f"{drv}{n}", drv, run[0] * bs, len(run) * bs,
                                   (dump.blocks[run[0]].nodes or [0])[0], run))
                taken.update(run)
                run = []
            if bid is not None:
                run.append(bid)
    return devs


def _boot_ram(dump: Dump, arch: str, page_size: int, devs: list[Device], bs: int) -> tuple[list[tuple[int, int]], str]:
    """Boot RAM ranges (end exclusive, page aligned) and where they came from."""
    dev_blocks = {b for d in devs for b in d.blocks}

    def minus_devices(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out = []
        for s, e in ranges:
            pos = s
            while pos < e:  # cut out the blocks of hot-plugged devices
                bid = pos // bs
                nxt = min(e, (bid + 1) * bs)
                if bid not in dev_blocks:
                    if out and out[-1][1] == pos:
                        out[-1] = (out[-1][0], nxt)
                    else:
                        out.append((pos, nxt))
                pos = nxt
        return out

    top = [(s, e) for s, e, name, depth in dump.iomem if depth == 0 and name == "System RAM"]
    if top:
        ranges, source = top, "proc/iomem \"System RAM\""
    elif dump.firmware_ram:
        ranges, source = dump.firmware_ram, "sys/firmware/memmap \"System RAM\""
    else:
        ids = sorted(b for b in dump.blocks if b not in dev_blocks)
        ranges = []
        for bid in ids:
            if ranges and ranges[-1][1] == bid * bs:
                ranges[-1] = (ranges[-1][0], (bid + 1) * bs)
            else:
                ranges.append((bid * bs, (bid + 1) * bs))
        source = "the memory blocks (no proc/iomem or firmware memmap: every boot block taken as full)"
        if arch == "x86_64" and ranges and ranges[0][0] == 0:  # pfn 0 is never RAM on x86 (e820 "reserved")
            ranges[0] = (page_size, ranges[0][1])
    aligned = []
    for s, e in ranges:
        if arch == "x86_64":
            s = max(s, 0x1000)  # x86 setup_arch(): e820 update [mem 0x00000000-0x00000fff] usable ==> reserved
        s, e = -(-s // page_size) * page_size, e // page_size * page_size
        if e > s:
            aligned.append((s, e))
    ram = minus_devices(aligned)
    # memory the sysroot has no block for is not RAM memfs can show (e.g. a mem= cut)
    ram = [r for r in ram if any(bid in dump.blocks for bid in range(r[0] // bs, (r[1] - 1) // bs + 1))]
    return ram, source


def _split_by_node(ram: list[tuple[int, int]], dump: Dump, bs: int) -> dict[int, list[tuple[int, int]]]:
    per: dict[int, list[tuple[int, int]]] = {}
    for s, e in ram:
        pos = s
        while pos < e:
            bid = pos // bs
            nxt = min(e, (bid + 1) * bs)
            blk = dump.blocks.get(bid)
            nid = (blk.nodes[-1] if blk and blk.nodes else 0)  # a block spanning nodes: the last links it
            lst = per.setdefault(nid, [])
            if lst and lst[-1][1] == pos:
                lst[-1] = (lst[-1][0], nxt)
            else:
                lst.append((pos, nxt))
            pos = nxt
    return per


def _subtract(lo: int, hi: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi) minus sorted, disjoint ranges."""
    pieces, pos = [], lo
    for rs, re_ in ranges:
        if re_ <= pos:
            continue
        if rs >= hi:
            break
        if rs > pos:
            pieces.append((pos, rs))
        pos = max(pos, re_)
        if pos >= hi:
            break
    if pos < hi:
        pieces.append((pos, hi))
    return pieces


def _nomap(dump: Dump, per_node: dict[int, list[tuple[int, int]]], devs: list[Device], bs: int,
           page_size: int) -> dict[int, list[tuple[int, int]]]:
    """Boot memory that is present in a zone but not System RAM: the firmware's nomap
    regions (arm64 MEMBLOCK_NOMAP, EFI runtime regions; /proc/iomem says "reserved").

    The candidates are the parts of boot blocks inside the node's zone spans that no RAM
    range covers; they are taken only when RAM + candidates add up to the zones' present
    pages exactly (on x86 the e820 gaps inside a span are not present, and the sum says so).
    """
    dev_blocks = {b for d in devs for b in d.blocks}
    out: dict[int, list[tuple[int, int]]] = {}
    for nid, zones in dump.zones.items():
        spans = [(z["start_pfn"] * page_size, (z["start_pfn"] + z["spanned"]) * page_size)
                 for z in zones if z.get("spanned") and "start_pfn" in z]
        ram = sorted(per_node.get(nid, []))
        cand: list[tuple[int, int]] = []
        for bid in sorted(b for b, blk in dump.blocks.items() if b not in dev_blocks and (blk.nodes or [0])[-1] == nid):
            for zs, ze in spans:
                lo, hi = max(bid * bs, zs), min((bid + 1) * bs, ze)
                if lo >= hi:
                    continue
                for piece in _subtract(lo, hi, ram):
                    if cand and cand[-1][1] == piece[0]:
                        cand[-1] = (cand[-1][0], piece[1])
                    else:
                        cand.append(piece)
        hot_present = sum(bs // page_size for b in dev_blocks if b in dump.blocks
                          and dump.blocks[b].state == "online" and (dump.blocks[b].nodes or [0])[0] == nid)
        present = sum(z.get("present", 0) for z in zones)
        ram_pages = sum(e - s for s, e in ram) // page_size
        if cand and ram_pages + sum(e - s for s, e in cand) // page_size + hot_present == present:
            out[nid] = cand
    return out


def _fmt_size(n: int) -> str:
    for shift, suf in ((40, "T"), (30, "G"), (20, "M")):
        if n and n % (1 << shift) == 0:
            return f'"{n >> shift}{suf}"'
    return f'"{n:#x}"'


@dataclass
class Description:
    text: str  # the TOML
    differences: list[str]  # attributes the description does not reproduce (also in the text)
    notes: list[str]


def describe(root: str | os.PathLike[str] = "/", kernel: str | None = None, arch: str | None = None) -> Description:
    """Read the sysroot at ``root`` and return its machine description (``kernel``: a profile
    or release, ``arch``: an ARCHES name, for dumps that do not say)."""
    live = os.path.realpath(root) == "/"
    dump = read_dump(root)
    notes: list[str] = []
    bs = dump.block_size
    page_size = os.sysconf("SC_PAGE_SIZE") if live else _guess_page_size(dump)
    if arch is None:
        arch, note = _arch(dump, live, page_size)
        if note:
            notes.append(note + "; give --arch to choose")
    elif arch not in ARCHES:
        raise DescribeError(f"--arch {arch}: one of {', '.join(ARCHES)}")
    page_size = ARCHES[arch].page_size
    release = dump.release or (os.uname().release if live else None)
    if kernel is not None:
        try:
            profile, note = resolve_kernel(kernel)
        except ValueError as e:
            raise DescribeError(f"--kernel: {e}") from None
        if note:
            notes.append(note)
    elif release is not None:
        profile, note = profile_for_release(release)
        if note:
            notes.append(note)
    old_removable = sorted(b.id for b in dump.blocks.values() if b.removable == "0")
    if kernel is None and release is None:
        if old_removable:  # only kernels before 5.7 say 0: the oldest profile is the nearest
            profile = min(PROFILES, key=lambda n: tuple(int(x) for x in n.split(".")))
            why = "`removable` reads 0, so the kernel is older than 5.7"
        else:
            profile = max(PROFILES, key=lambda n: tuple(int(x) for x in n.split(".")))
            why = "the newest"
        notes.append(f"the dump has no proc/sys/kernel/osrelease: profile {profile} ({why}); "
                     f"give --kernel to choose")
    if old_removable:
        notes.append(f"`removable` reads 0 for memory{bitmap_list(old_removable)}: kernels before 5.7 computed it "
                     f"per block (is_mem_section_removable); memfs models 5.12+ and always shows 1")
    devs = _devices(dump, bs)
    ram, source = _boot_ram(dump, arch, page_size, devs, bs)
    notes.append(f"boot RAM from {source}")
    per_node = _split_by_node(ram, dump, bs)
    nomap = _nomap(dump, per_node, devs, bs, page_size)
    node_ids = sorted(set(dump.possible_nodes or []) | set(per_node) | {n for b in dump.blocks.values()
                                                                       for n in b.nodes} | {d.node for d in devs})
    if not node_ids:
        node_ids = [0]
    has_cpu = dump.has_cpu
    movable_node = bool(dump.cmdline and re.search(r"(^|\s)movable_node(\s|$)", dump.cmdline))

    raw: dict = {"kernel": profile, "arch": arch, "block_size": bs, "probe": dump.probe,
                 "hotplug": {}, "boot": {}, "node": [], "dimm": [], "state": []}
    boot = raw["boot"]
    if dump.auto_online_blocks in ("offline", "online", "online_kernel", "online_movable"):
        boot["memhp_default_state"] = dump.auto_online_blocks
    p = dump.params
    mm = p.get("memmap_on_memory")
    if mm is not None:
        boot["memmap_on_memory"] = "force" if mm == "force" else mm in ("Y", "1")
    elif PROFILES[profile].memmap_on_memory:
        boot["memmap_on_memory"] = False
    if p.get("online_policy") in ("contig-zones", "auto-movable"):
        boot["online_policy"] = p["online_policy"]
    if p.get("auto_movable_ratio", "").isdigit():
        boot["auto_movable_ratio"] = int(p["auto_movable_ratio"])
    if p.get("auto_movable_numa_aware") in ("Y", "N"):
        boot["auto_movable_numa_aware"] = p["auto_movable_numa_aware"] == "Y"
    boot["movable_node"] = movable_node
    for nid in node_ids:
        cpus: bool | str = (nid in has_cpu) if has_cpu is not None else True
        if nid in dump.node_cpulist:
            cpus = dump.node_cpulist[nid] or False  # nodeN/cpulist, "%*pbl"
        node: dict = {"id": nid, "ram": [f"{s:#x}-{e:#x}" for s, e in per_node.get(nid, [])],
                      "reserved": 0, "used": 0, "cpus": cpus}
        if nid in nomap:
            node["nomap"] = [f"{s:#x}-{e:#x}" for s, e in nomap[nid]]
        dist = dump.node_distance.get(nid)
        if dist is not None and len(dist) == len(node_ids) and len(node_ids) > 1:
            node["distance"] = dist  # the SLIT row, one per node in id order (online nodes only in sysfs)
        raw["node"].append(node)
    acpi = [d for d in devs if d.driver == "acpi"]
    slots = max([dump.acpi_slots, len(acpi)] + [int(d.id[4:]) for d in acpi])
    # the window: where QEMU puts device memory (base "auto"); its size is not in sysfs
    raw["hotplug"] = {"size": 23 * GiB, "slots": slots}
    if arch.startswith("arm64") and acpi:
        raw["acpi_memory_hotplug"] = True  # ACPI memory devices exist: the kernel has the driver
    for d in sorted(devs, key=lambda d: (d.driver != "acpi", d.id if d.driver != "acpi" else f"{int(d.id[4:]):04d}")):
        dimm = {"id": d.id, "size": d.size, "node": d.node, "addr": d.start, "driver": d.driver}
        if d.driver == "acpi":
            dimm["slot"] = int(d.id[4:]) - 1  # PNP0C80:NN of its firmware_node
        elif d.driver == "virtio_mem":
            # sysfs shows what the driver plugged, not the device's region: both are that size
            dimm["requested"] = d.size
        raw["dimm"].append(dimm)

    # [[state]]: every block whose state or zone differs from the machine as booted
    def build(r: dict) -> Machine:
        return Machine(from_dict(r))

    try:
        m0 = build(raw)
        base = int(m0.cfg.hotplug_base)
        dev_end = max((d.start + d.size for d in devs), default=0)
        if dev_end > base + raw["hotplug"]["size"]:  # the devices show the window is larger
            raw["hotplug"]["size"] = -(-(dev_end - base) // bs) * bs
            m0 = build(raw)
    except ConfigError as e:
        raise DescribeError(f"the machine read from {dump.root} cannot be booted by memfs: {e}") from None
    offline, online = [], []
    for bid in sorted(dump.blocks):
        blk = dump.blocks[bid]
        mem = m0.blocks.get(bid)
        if mem is None:
            continue
        want_online = blk.state in ("online", "going-offline")
        zone = blk.valid_zones if want_online and blk.valid_zones and " " not in blk.valid_zones \
            and blk.valid_zones != "none" else None
        cur_zone = mem.zone.name if mem.zone is not None else None
        if not want_online:
            if mem.state != "offline":
                offline.append(bid)
        elif mem.state != "online" or (zone is not None and cur_zone != zone):
            online.append((bid, zone))
    if offline:
        raw["state"].append({"blocks": bitmap_list(offline), "state": "offline"})
    groups: list[tuple[list[int], str | None]] = []
    for bid, zone in online:
        if groups and groups[-1][1] == zone and groups[-1][0][-1] == bid - 1:
            groups[-1][0].append(bid)
        else:
            groups.append(([bid], zone))
    for ids, zone in groups:
        st: dict = {"blocks": bitmap_list(ids)}
        st["state"] = "online" if zone is None else "online_movable" if zone == "Movable" else "online_kernel"
        if zone is not None:
            st["zone"] = zone
        raw["state"].append(st)

    def build_applicable(r: dict) -> Machine:
        """Boot the description; a [[state]] entry the model refuses is left out and said."""
        while True:
            try:
                return build(r)
            except ConfigError as e:
                m = re.match(r"^state\[(\d+)\]", str(e))
                if not m:
                    raise
                dropped = r["state"].pop(int(m.group(1)))
                notes.append(f"left out [[state]] blocks = {dropped['blocks']!r}, state = {dropped['state']!r}: {e}")

    # calibrate reserved and used boot memory against zoneinfo and node meminfo
    calibrated = False
    try:
        m1 = build_applicable(raw)
        if dump.zone_managed:
            for n in raw["node"]:
                nid = n["id"]
                if nid in dump.zone_managed and nid in m1.nodes:
                    extra = m1.nodes[nid].managed - dump.zone_managed[nid]
                    n["reserved"] = max(0, extra) * page_size
            m2 = build_applicable(raw)
            for n in raw["node"]:
                nid = n["id"]
                if nid in dump.node_used_kb and nid in m2.nodes:
                    # MemUsed as the node shows it: pages in use plus what sits on the
                    # per-cpu lists (MemFree does not count those)
                    have = m2.meminfo(nid)["MemUsed"] * 1024 // page_size
                    want = dump.node_used_kb[nid] * 1024 // page_size
                    n["used"] = max(0, want - have) * page_size
                    present = sum(e - s for s, e in per_node.get(nid, []))
                    n["used"] = min(n["used"], present - n["reserved"])
            calibrated = True
        m3 = build_applicable(raw)
    except ConfigError as e:
        raise DescribeError(f"the description of {dump.root} cannot be booted by memfs ({e}); "
                            f"please report this with the dump") from None
    if not calibrated:
        notes.append("no proc/zoneinfo: reserved and used boot memory are unknown (0)")
    differences = compare(dump, m3)
    text = render(raw, dump, notes, differences, release)
    return Description(text, differences, notes)


def compare(dump: Dump, m: Machine) -> list[str]:
    """Every memory block attribute of the dump that the booted description reads differently."""
    tree = build_tree(m)
    diffs: list[str] = []
    for bid in sorted(dump.blocks):
        blk = dump.blocks[bid]
        if bid not in m.blocks:
            diffs.append(f"memory{bid}: missing")
            continue
        for f, want in blk.files.items():
            got = tree.resolve(f"/{MEMORY}/memory{bid}/{f}").show()
            if got != want:
                diffs.append(f"memory{bid}/{f}: {want.strip()!r} here, {got.strip()!r} in memfs")
        mem = m.blocks[bid]
        got_slot = mem.device.slot if mem.device is not None else None
        if blk.acpi_slot != got_slot:
            diffs.append(f"memory{bid}: ACPI slot {blk.acpi_slot} here, {got_slot} in memfs (firmware_node)")
        got_nodes = sorted(m.blocks[bid].nids)
        if blk.nodes and got_nodes != blk.nodes:
            diffs.append(f"memory{bid}: node links {blk.nodes} here, {got_nodes} in memfs")
    extra = sorted(set(m.blocks) - set(dump.blocks))
    if extra:
        diffs.append(f"memory{bitmap_list(extra)}: exist in memfs only")
    return diffs


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(raw: dict, dump: Dump, notes: list[str], differences: list[str], release: str | None) -> str:
    out = [f"# memfs machine description of {'this machine' if str(dump.root) == '/' else dump.root}",
           "# written by `memfs describe`; mount it with: memfs mount MNT --config THIS_FILE",
           f"# kernel release: {release or 'unknown'}"]
    out += [f"# note: {n}" for n in notes]
    out += ["#",
            "# Not in sysfs, so not reproduced (memfs's defaults apply):",
            "# - which pages are unmovable: the kernel's used memory is one unmovable allocation",
            "#   placed from the top of each node down (memfs status shows where), and user",
            "#   allocations are not known at all; offlining a block may fail or succeed where",
            "#   the real machine's would not",
            "# - how the reserved boot memory is split between zones (memfs keeps it at the top",
            "#   of each node), CMA, the kernel image, hwpoisoned pages",
            "# - device ids (named after the ACPI slot or the driver), which devices use",
            "#   memmap_on_memory (memfs follows the boot parameter and the profile), the size of",
            "#   the hotplug window (QEMU: maxmem - RAM)",
            ""]
    for k in ("kernel", "arch", "block_size", "probe", "acpi_memory_hotplug"):
        if k in raw:
            v = raw[k]
            out.append(f"{k} = {_fmt_size(v) if k == 'block_size' else _toml_value(v)}")
    hp = raw["hotplug"]
    out += ["", "[hotplug]", "base = \"auto\"    # where QEMU puts device memory: after boot RAM, 1G aligned",
            f"size = {_fmt_size(hp['size'])}", f"slots = {hp['slots']}", "", "[boot]"]
    for k, v in raw["boot"].items():
        out.append(f"{k} = {_toml_value(v)}")
    for n in raw["node"]:
        out += ["", "[[node]]", f"id = {n['id']}",
                "ram = [" + ", ".join(_toml_value(r) for r in n["ram"]) + "]"]
        if "nomap" in n:
            out.append("nomap = [" + ", ".join(_toml_value(r) for r in n["nomap"]) + "]    # present, not System RAM")
        out += [f"reserved = {n['reserved']}    # bytes: boot memory present but not managed",
                f"used = {n['used']}    # bytes: managed boot memory in use (MemUsed)",
                f"cpus = {_toml_value(n['cpus'])}"]
        if "distance" in n:
            out.append(f"distance = {_toml_value(n['distance'])}")
    for d in raw["dimm"]:
        out += ["", "[[dimm]]", f"id = {_toml_value(d['id'])}", f"size = {_fmt_size(d['size'])}",
                f"node = {d['node']}", f"addr = \"{d['addr']:#x}\"", f"driver = {_toml_value(d['driver'])}"]
        if "slot" in d:
            out.append(f"slot = {d['slot']}")
        if "requested" in d:
            out.append(f"requested = {_fmt_size(d['requested'])}    # what the driver has plugged")
    if raw["state"]:
        out += ["", "# The blocks' state after boot, written to memoryN/state in this order at mount"]
    for st in raw["state"]:
        out += ["", "[[state]]"] + [f"{k} = {_toml_value(v)}" for k, v in st.items()]
    if differences:
        out += ["", f"# memfs reads {len(differences)} attribute(s) differently from the source:"]
        out += [f"#   {d}" for d in differences[:200]]
        if len(differences) > 200:
            out.append(f"#   ... and {len(differences) - 200} more")
    return "\n".join(out) + "\n"
