"""Machine description: a TOML file (or the embedded default) turned into typed config.

The keys are a contract other tools rely on (docs/machine.md). Anything
unknown or inconsistent is refused at load with a message naming the key and the fix.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from .profiles import ARCHES, BOOT_CALIBRATION, DEFAULT_ARCH, DEFAULT_KERNEL, PROFILES, GiB, MiB, resolve_kernel


class ConfigError(ValueError):
    """A machine description the kernel could never have booted with."""


_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|\d+)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(value: Any, key: str = "size") -> int:
    """``128M``, ``1G``, ``0x8000000``, ``134217728`` -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like 128M, 1G or 0x8000000, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: size must not be negative, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1), 0) * _SUFFIX[m.group(2).upper()]
    raise ConfigError(f"{key}: expected a size like 128M, 1G or 0x8000000, got {value!r}")


def parse_range(value: Any, key: str) -> tuple[int, int]:
    """``"0x1000-0x9f000"`` (end exclusive) -> (start, end) in bytes."""
    if isinstance(value, str) and "-" in value:
        a, b = value.split("-", 1)
        start, end = parse_size(a, key), parse_size(b, key)
        if end > start:
            return start, end
    raise ConfigError(f"{key}: expected a range like \"0x100000-0x3ffe0000\" (end exclusive), got {value!r}")


ONLINE_TYPES = ("offline", "online", "online_kernel", "online_movable")
DRIVERS = ("acpi", "probe", "dax_kmem", "virtio_mem")


@dataclass
class BootConfig:
    """The kernel command line."""
    memmap_on_memory: bool | str = True  # True/False, or "force" (6.6+)
    memhp_default_state: str = "offline"
    online_policy: str = "contig-zones"
    auto_movable_ratio: int = 301
    auto_movable_numa_aware: bool = True
    movable_node: bool = False


@dataclass
class NodeConfig:
    id: int
    ram: list[tuple[int, int]] = field(default_factory=list)  # boot RAM, bytes, end exclusive
    # memory the firmware keeps for itself that memblock still lists (EFI runtime regions,
    # arm64 MEMBLOCK_NOMAP): present in the zone, never managed, not "System RAM", so a
    # block holding some has holes for offline_pages()
    nomap: list[tuple[int, int]] = field(default_factory=list)
    reserved: int | str = 0  # bytes the kernel keeps at boot (present, not managed), or "auto"
    used: int | str = 0  # bytes of managed memory the booted kernel has in use, or "auto"
    cpus: bool = True  # a node with CPUs stays online even without memory
    cpu_ids: list[int] = field(default_factory=list)  # resolved by validate(): nodeN/cpulist
    # node_distance(id, j) for each [[node]] j in id order (the ACPI SLIT row); empty: 10 to
    # itself, 20 to the others (LOCAL_DISTANCE, REMOTE_DISTANCE of include/linux/topology.h)
    distance: list[int] = field(default_factory=list)


RESERVE_KINDS = ("kernel", "firmware", "reserved", "cma", "used")


@dataclass
class ReserveConfig:
    """A boot-time reservation at a known place (memblock_reserve() or the CMA area).

    kernel/firmware/reserved: PageReserved pages (present, not managed) that page
    isolation refuses; cma: managed pages in MIGRATE_CMA pageblocks, which offlining
    cannot isolate either (mm/page_isolation.c has_unmovable_pages()); used: managed pages
    the booted kernel holds there (slab, page tables: unmovable), on top of [[node]] used.
    """
    start: int
    end: int
    kind: str = "reserved"


@dataclass
class DimmConfig:
    id: str
    size: int
    node: int = 0
    addr: int | None = None
    driver: str = "acpi"
    requested: int = 0  # virtio-mem: the size plugged at boot (size is the device region)
    slot: int | None = None  # ACPI: the PNP0C80 instance (memoryN/firmware_node); None: first free


@dataclass
class StateConfig:
    """One ``[[state]]`` entry: what was written to these blocks' ``state`` files after boot.

    Applied at mount in file order through the model's own online/offline paths
    (drivers/base/memory.c state_store() -> memory_block_change_state()), so zones,
    spans and accounting come out as if a udev rule or an admin had made the writes.
    """
    blocks: list[int]
    state: str  # offline, online, online_kernel, online_movable (the word written)
    zone: str | None = None  # online only: the zone the blocks must end up in (checked)


@dataclass
class MachineConfig:
    kernel: str = DEFAULT_KERNEL
    arch: str = DEFAULT_ARCH
    struct_page_size: int = 64
    block_size: int | str = "auto"
    hypervisor: bool = True  # x86 probe_memory_block_size: VMs align to end of RAM
    probe: bool = False  # CONFIG_ARCH_MEMORY_PROBE: /sys/devices/system/memory/probe
    offline_latency_ms: int = 0  # how long offlining takes (migration time), for racing readers
    hotplug_base: int | str = "auto"  # resolved by validate(): QEMU's device-memory base
    hotplug_size: int = 23 * GiB
    slots: int = 8
    # CONFIG_ACPI_HOTPLUG_MEMORY: "auto" resolves per arch (Debian: x86_64 y, arm64 unset)
    acpi_memory_hotplug: bool | str = "auto"
    # arm64: the highest CPU address + 1 that DMA masters reach, as the device tree's
    # dma-ranges or the IORT say (of_dma_get_max_cpu_address(), acpi_iort_dma_get_max_cpu_address());
    # None: the firmware states no limit (the kernel sees PHYS_ADDR_MAX)
    dma_limit: int | None = None
    boot: BootConfig = field(default_factory=BootConfig)
    nodes: list[NodeConfig] = field(default_factory=list)
    dimms: list[DimmConfig] = field(default_factory=list)
    states: list[StateConfig] = field(default_factory=list)
    reserves: list[ReserveConfig] = field(default_factory=list)

    @property
    def profile(self):
        return PROFILES[self.kernel]

    @property
    def arch_profile(self):
        return ARCHES[self.arch]


_TOP_KEYS = {"kernel", "arch", "struct_page_size", "block_size", "hypervisor", "probe", "offline_latency_ms",
             "acpi_memory_hotplug", "dma_limit", "hotplug", "boot", "node", "dimm", "reserve", "state"}
_HOTPLUG_KEYS = {"base", "size", "slots"}
_BOOT_KEYS = set(BootConfig.__dataclass_fields__)
_NODE_KEYS = {"id", "ram", "nomap", "reserved", "used", "cpus", "distance"}
_RESERVE_KEYS = {"range", "kind"}
_DIMM_KEYS = {"id", "size", "node", "addr", "driver", "requested", "slot"}
_STATE_KEYS = {"blocks", "state", "zone"}
ZONE_NAMES = ("DMA", "DMA32", "Normal", "Movable")


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    for k in table:
        if k not in allowed:
            raise ConfigError(f"{where}{k}: unknown key; allowed here: {', '.join(sorted(allowed))}")


def _bool(v: Any, key: str) -> bool:
    if isinstance(v, bool):
        return v
    raise ConfigError(f"{key}: expected true or false, got {v!r}")


def _int(v: Any, key: str) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise ConfigError(f"{key}: expected an integer, got {v!r}")


def default_text() -> str:
    return resources.files("memfs").joinpath("data/default.toml").read_text()


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                kernel: str | None = None) -> MachineConfig:
    """Load a machine description; ``None`` means the embedded default machine."""
    text = Path(path).read_text() if path is not None else default_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path or 'default machine'}: not valid TOML: {e}") from None
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    if kernel is not None:
        raw["kernel"] = kernel
    return from_dict(raw)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    d = raw
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a table")
    d[parts[-1]] = value


def parse_sets(sets: Iterable[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` arguments (of ``memfs mount`` and the daemon) -> overrides."""
    overrides: dict[str, Any] = {}
    for kv in sets:
        k, sep, v = kv.partition("=")
        if not sep or not k.strip():
            raise ConfigError(f"--set {kv}: expected KEY=VALUE, e.g. --set boot.memhp_default_state=online")
        overrides[k.strip()] = parse_set_value(v)
    return overrides


def parse_set_value(text: str) -> Any:
    """Value of ``--set KEY=VALUE``: TOML syntax when it parses, else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def from_dict(raw: dict[str, Any]) -> MachineConfig:
    _check_keys(raw, _TOP_KEYS, "")
    cfg = MachineConfig()
    if "kernel" in raw:
        try:  # a profile name, or a release string such as 6.12.117+deb13-amd64
            cfg.kernel, _ = resolve_kernel(str(raw["kernel"]))
        except ValueError as e:
            raise ConfigError(f"kernel: {e}") from None
    if "arch" in raw:
        cfg.arch = str(raw["arch"])
        if cfg.arch not in ARCHES:
            raise ConfigError(f"arch: unknown {cfg.arch!r}; choose one of {', '.join(ARCHES)}")
    if "struct_page_size" in raw:
        cfg.struct_page_size = _int(raw["struct_page_size"], "struct_page_size")
        if cfg.struct_page_size <= 0:
            raise ConfigError("struct_page_size: must be a positive number of bytes (64 on most kernels)")
    if "block_size" in raw:
        bs = raw["block_size"]
        cfg.block_size = "auto" if bs == "auto" else parse_size(bs, "block_size")
    if "hypervisor" in raw:
        cfg.hypervisor = _bool(raw["hypervisor"], "hypervisor")
    if "probe" in raw:
        cfg.probe = _bool(raw["probe"], "probe")
    if "offline_latency_ms" in raw:
        cfg.offline_latency_ms = _int(raw["offline_latency_ms"], "offline_latency_ms")
        if not 0 <= cfg.offline_latency_ms <= 60_000:
            raise ConfigError("offline_latency_ms: between 0 and 60000 milliseconds")
    if "acpi_memory_hotplug" in raw:
        v = raw["acpi_memory_hotplug"]
        cfg.acpi_memory_hotplug = "auto" if v == "auto" else _bool(v, "acpi_memory_hotplug")
    if "dma_limit" in raw:
        v = raw["dma_limit"]
        cfg.dma_limit = None if v == "none" else parse_size(v, "dma_limit")
        if cfg.dma_limit == 0:
            raise ConfigError("dma_limit: \"none\" (no firmware limit) or an address above 0, e.g. \"1G\"")
    hp = raw.get("hotplug", {})
    _check_keys(hp, _HOTPLUG_KEYS, "hotplug.")
    if "base" in hp:
        cfg.hotplug_base = "auto" if hp["base"] == "auto" else parse_size(hp["base"], "hotplug.base")
    if "size" in hp:
        cfg.hotplug_size = parse_size(hp["size"], "hotplug.size")
    if "slots" in hp:
        cfg.slots = _int(hp["slots"], "hotplug.slots")
        if not 0 <= cfg.slots <= 256:
            raise ConfigError("hotplug.slots: must be between 0 and 256")
    cfg.boot = _boot(raw.get("boot", {}), cfg)
    cfg.nodes = [_node(n, i) for i, n in enumerate(raw.get("node", []))]
    if not cfg.nodes:
        raise ConfigError("node: at least one [[node]] with boot RAM is needed, e.g. ram = [\"0x100000-0x40000000\"]")
    cfg.dimms = [_dimm(d, i) for i, d in enumerate(raw.get("dimm", []))]
    cfg.states = [_state(t, i) for i, t in enumerate(raw.get("state", []))]
    cfg.reserves = [_reserve(r, i) for i, r in enumerate(raw.get("reserve", []))]
    validate(cfg)
    return cfg


def _boot(t: dict, cfg: MachineConfig) -> BootConfig:
    _check_keys(t, _BOOT_KEYS, "boot.")
    b = BootConfig()
    if "memmap_on_memory" in t:
        v = t["memmap_on_memory"]
        if isinstance(v, str) and v.lower() == "force":
            if not cfg.profile.memmap_force:
                raise ConfigError(f"boot.memmap_on_memory: \"force\" needs a 6.6+ kernel profile (this is {cfg.kernel})")
            b.memmap_on_memory = "force"
        else:
            b.memmap_on_memory = _bool(v, "boot.memmap_on_memory")
    if "memhp_default_state" in t:
        b.memhp_default_state = str(t["memhp_default_state"])
        if b.memhp_default_state not in ONLINE_TYPES:
            raise ConfigError(f"boot.memhp_default_state: one of {', '.join(ONLINE_TYPES)}")
    if "online_policy" in t:
        b.online_policy = str(t["online_policy"])
        if b.online_policy not in ("contig-zones", "auto-movable"):
            raise ConfigError("boot.online_policy: \"contig-zones\" or \"auto-movable\"")
    if "auto_movable_ratio" in t:
        b.auto_movable_ratio = _int(t["auto_movable_ratio"], "boot.auto_movable_ratio")
        if not 0 <= b.auto_movable_ratio < 1 << 32:
            raise ConfigError("boot.auto_movable_ratio: an unsigned percentage, e.g. 301")
    if "auto_movable_numa_aware" in t:
        b.auto_movable_numa_aware = _bool(t["auto_movable_numa_aware"], "boot.auto_movable_numa_aware")
    if "movable_node" in t:
        b.movable_node = _bool(t["movable_node"], "boot.movable_node")
    return b


def _node(t: dict, i: int) -> NodeConfig:
    where = f"node[{i}]."
    _check_keys(t, _NODE_KEYS, where)
    if "id" not in t:
        raise ConfigError(f"{where}id: every [[node]] needs an id")
    n = NodeConfig(id=_int(t["id"], where + "id"))
    ram = t.get("ram", [])
    if isinstance(ram, str):
        ram = [ram]
    n.ram = sorted(parse_range(r, where + "ram") for r in ram)
    nomap = t.get("nomap", [])
    if isinstance(nomap, str):
        nomap = [nomap]
    n.nomap = sorted(parse_range(r, where + "nomap") for r in nomap)
    # "auto": what the profile's kernel build reserves and uses at boot (resolved in validate)
    n.reserved = "auto" if t.get("reserved") == "auto" else parse_size(t.get("reserved", 0), where + "reserved")
    n.used = "auto" if t.get("used") == "auto" else parse_size(t.get("used", 0), where + "used")
    cpus = t.get("cpus", True)
    if isinstance(cpus, str):
        n.cpu_ids = parse_cpulist(cpus, where + "cpus")
        n.cpus = bool(n.cpu_ids)
    else:
        n.cpus = _bool(cpus, where + "cpus")
    dist = t.get("distance", [])
    if not isinstance(dist, list):
        raise ConfigError(f"{where}distance: a list, one distance per [[node]] in id order, e.g. [10, 20]")
    n.distance = [_int(x, where + "distance") for x in dist]
    return n


def parse_cpulist(text: str, key: str) -> list[int]:
    """A "%*pbl" CPU list, as nodeN/cpulist shows it: "0-3,8" -> [0, 1, 2, 3, 8]; "" -> []."""
    ids: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        a, _, b = part.partition("-")
        if not a.isdigit() or (b and not b.isdigit()) or (b and int(b) < int(a)):
            raise ConfigError(f"{key}: expected true or false, or a CPU list like \"0-3,8\", got {text!r}")
        ids.update(range(int(a), int(b or a) + 1))
        if len(ids) > 8192:
            raise ConfigError(f"{key}: at most 8192 CPUs (NR_CPUS of Debian's kernels)")
    return sorted(ids)


def _dimm(t: dict, i: int) -> DimmConfig:
    where = f"dimm[{i}]."
    _check_keys(t, _DIMM_KEYS, where)
    if "size" not in t:
        raise ConfigError(f"{where}size: every [[dimm]] needs a size, e.g. size = \"128M\"")
    d = DimmConfig(id=str(t.get("id", f"dimm{i + 1}")), size=parse_size(t["size"], where + "size"))
    d.node = _int(t.get("node", 0), where + "node")
    if "addr" in t:
        d.addr = parse_size(t["addr"], where + "addr")
    d.driver = str(t.get("driver", "acpi"))
    if d.driver not in DRIVERS:
        raise ConfigError(f"{where}driver: one of {', '.join(DRIVERS)}")
    if "requested" in t:
        if d.driver != "virtio_mem":
            raise ConfigError(f"{where}requested: only a virtio-mem device (driver = \"virtio_mem\") has a "
                              f"requested size; other devices are plugged whole")
        d.requested = parse_size(t["requested"], where + "requested")
    if "slot" in t:
        d.slot = _int(t["slot"], where + "slot")
        if d.driver != "acpi":
            raise ConfigError(f"{where}slot: only ACPI DIMMs (driver = \"acpi\") sit in a slot")
    return d


def parse_block_list(value: Any, key: str) -> list[int]:
    """Block ids: ``32``, ``[32, 33]`` or lsmem's BLOCK column ``"0-7,32-41"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                 for v in value):
        return list(value)
    if isinstance(value, str) and value.strip():
        ids: list[int] = []
        for part in value.split(","):
            a, sep, b = part.strip().partition("-")
            if not a.isdigit() or (sep and not b.isdigit()) or (sep and int(b) < int(a)):
                break
            ids.extend(range(int(a), int(b) + 1) if sep else [int(a)])
        else:
            return ids
    raise ConfigError(f"{key}: expected block ids like 32, [32, 33] or \"0-7,32-41\", got {value!r}")


def _state(t: dict, i: int) -> StateConfig:
    where = f"state[{i}]."
    _check_keys(t, _STATE_KEYS, where)
    if "blocks" not in t or "state" not in t:
        raise ConfigError(f"{where[:-1]}: every [[state]] needs blocks and state, "
                          f"e.g. blocks = \"32-33\" and state = \"online_movable\"")
    st = StateConfig(blocks=parse_block_list(t["blocks"], where + "blocks"), state=str(t["state"]))
    if st.state not in ONLINE_TYPES:
        raise ConfigError(f"{where}state: one of {', '.join(ONLINE_TYPES)} (the word written to memoryN/state)")
    if "zone" in t:
        st.zone = str(t["zone"])
        if st.zone not in ZONE_NAMES:
            raise ConfigError(f"{where}zone: one of {', '.join(ZONE_NAMES)}")
        if st.state == "offline":
            raise ConfigError(f"{where}zone: only for blocks that go online (an offline block has no zone)")
        if (st.state == "online_movable") != (st.zone == "Movable"):
            raise ConfigError(f"{where}zone: {st.state} cannot put a block into {st.zone}")
    return st


def _reserve(t: dict, i: int) -> ReserveConfig:
    where = f"reserve[{i}]."
    _check_keys(t, _RESERVE_KEYS, where)
    if "range" not in t:
        raise ConfigError(f"{where}range: every [[reserve]] needs a range, e.g. range = \"0x40200000-0x42000000\"")
    start, end = parse_range(t["range"], where + "range")
    kind = str(t.get("kind", "reserved"))
    if kind not in RESERVE_KINDS:
        raise ConfigError(f"{where}kind: one of {', '.join(RESERVE_KINDS)}")
    return ReserveConfig(start, end, kind)


def boot_end(cfg: MachineConfig) -> int:
    """memblock_end_of_DRAM(): the end of the highest boot memory (RAM or nomap)."""
    return max((e for n in cfg.nodes for _, e in n.ram + n.nomap), default=0)


def qemu_device_memory_base(cfg: MachineConfig, block_size: int) -> int:
    """Where QEMU puts the device-memory region (DIMMs, virtio-mem) when the description does not.

    hw/i386/pc.c pc_memory_init() (QEMU 7.2): ROUND_UP(4 GiB + above_4g_mem_size, 1 GiB), i.e.
    after the end of boot RAM above 4 GiB; hw/arm/virt.c virt_set_memmap():
    ROUND_UP(RAM base + ram_size, 1 GiB). Then up to the block size, since the kernel adds
    memory in whole blocks only (a 2 GiB block on a machine whose RAM ends on an odd GiB).
    """
    end = boot_end(cfg)
    if cfg.arch == "x86_64":
        end = max(end, 4 * GiB)
    base = -(-end // GiB) * GiB
    return -(-base // block_size) * block_size


def probe_memory_block_size(cfg: MachineConfig) -> int:
    """arch/x86/mm/init_64.c probe_memory_block_size(); other arches: the section size."""
    arch = cfg.arch_profile
    if cfg.arch != "x86_64":
        return arch.section_size
    end = max((e for n in cfg.nodes for _, e in n.ram), default=0)  # max_pfn: e820 RAM only
    if end < 64 * GiB:
        return 128 * MiB
    if not cfg.hypervisor:
        return 2 * GiB
    bz = 2 * GiB
    while bz > 128 * MiB and end & (bz - 1):
        bz >>= 1
    return bz


def _resolve_cpus_and_distances(cfg: MachineConfig) -> None:
    """`cpus = true` gives a node one CPU, numbered after the listed ones in node-id order."""
    owner: dict[int, int] = {}
    for n in cfg.nodes:
        for c in n.cpu_ids:
            if c in owner:
                raise ConfigError(f"node[{n.id}].cpus: CPU {c} is on node {owner[c]} already")
            owner[c] = n.id
    nxt = max(owner, default=-1) + 1
    for n in sorted(cfg.nodes, key=lambda n: n.id):
        if n.cpus and not n.cpu_ids:
            n.cpu_ids = [nxt]
            nxt += 1
    ids = sorted(n.id for n in cfg.nodes)
    for n in cfg.nodes:
        if not n.distance:
            continue
        where = f"node[{n.id}].distance"
        if len(n.distance) != len(ids):
            raise ConfigError(f"{where}: one distance per [[node]] ({len(ids)}, in id order), got {len(n.distance)}")
        for j, d in zip(ids, n.distance):
            # drivers/acpi/numa/srat.c slit_valid(): 10 to itself, more than 10 to the others
            if (j == n.id and d != 10) or (j != n.id and not 10 < d < 255):
                raise ConfigError(f"{where}: {d} to node {j}: the distance to itself is 10, to others 11..254")


def resolve_boot_numbers(cfg: MachineConfig) -> None:
    """``reserved``/``used`` = "auto": the boot numbers of the profile's kernel build.

    Reserved: the memmap of the node's boot sections (memblock-allocated by sparse_init(),
    mm/sparse.c, never freed to the buddy allocator) plus, on the first node with RAM, the
    build's other early reservations (kernel image, SWIOTLB, ...). Used: the build's pages
    in use after boot, on that same node. Both in bytes once resolved."""
    arch = cfg.arch_profile
    cal = BOOT_CALIBRATION[cfg.kernel]
    section_pages = arch.section_size // arch.page_size
    memmap_pages = -(-section_pages * cfg.struct_page_size // arch.page_size)
    first = next((n.id for n in sorted(cfg.nodes, key=lambda n: n.id) if n.ram), None)
    for n in cfg.nodes:
        if n.reserved == "auto":
            sections = {pfn // section_pages for s, e in n.ram
                        for pfn in range(s // arch.page_size, e // arch.page_size, section_pages)}
            sections |= {(e // arch.page_size - 1) // section_pages for s, e in n.ram if e > s}
            pages = len(sections) * memmap_pages + (cal.early_reserved if n.id == first else 0)
            n.reserved = pages * arch.page_size
        if n.used == "auto":
            n.used = (cal.used if n.id == first else 0) * arch.page_size


def validate(cfg: MachineConfig) -> None:
    arch = cfg.arch_profile
    if cfg.block_size == "auto":
        cfg.block_size = probe_memory_block_size(cfg)
    bs = int(cfg.block_size)
    if bs < arch.section_size or bs & (bs - 1):
        raise ConfigError(f"block_size: must be a power of two of at least the section size "
                          f"({arch.section_size >> 20}M on {cfg.arch}); got {bs:#x}")
    ids = [n.id for n in cfg.nodes]
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise ConfigError("node.id: node ids must be unique and non-negative")
    resolve_boot_numbers(cfg)
    spans: list[tuple[int, int, str]] = []
    for n in cfg.nodes:
        for s, e in n.ram:
            if s % arch.page_size or e % arch.page_size:
                raise ConfigError(f"node[{n.id}].ram: range {s:#x}-{e:#x} is not page aligned ({arch.page_size:#x})")
            spans.append((s, e, f"node {n.id} ram {s:#x}-{e:#x}"))
        for s, e in n.nomap:
            if s % arch.page_size or e % arch.page_size:
                raise ConfigError(f"node[{n.id}].nomap: range {s:#x}-{e:#x} is not page aligned ({arch.page_size:#x})")
            spans.append((s, e, f"node {n.id} nomap {s:#x}-{e:#x}"))
        present = sum(e - s for s, e in n.ram)
        if n.reserved + n.used > present:
            raise ConfigError(f"node[{n.id}]: reserved + used ({(n.reserved + n.used) >> 20}M) exceed its boot RAM ({present >> 20}M)")
    _resolve_cpus_and_distances(cfg)
    if cfg.hotplug_base == "auto":
        cfg.hotplug_base = qemu_device_memory_base(cfg, bs)
    if cfg.acpi_memory_hotplug == "auto":
        # Debian builds CONFIG_ACPI_HOTPLUG_MEMORY on x86_64 only (arm64 6.1, 6.12 and 7.2: unset)
        cfg.acpi_memory_hotplug = cfg.arch == "x86_64"
    if cfg.dma_limit is not None and cfg.arch == "x86_64":
        raise ConfigError("dma_limit: only arm64 sizes ZONE_DMA from the firmware; x86_64's is always 16 MiB")
    if int(cfg.hotplug_base) % bs or cfg.hotplug_size % bs:
        raise ConfigError(f"hotplug: base and size must be multiples of the block size ({bs:#x})")
    seen: set[str] = set()
    for d in cfg.dimms:
        where = f"dimm {d.id!r}"
        if d.id in seen:
            raise ConfigError(f"{where}: duplicate id; give each [[dimm]] its own id")
        seen.add(d.id)
        if d.size == 0 or d.size % bs:
            raise ConfigError(f"{where}: size {d.size:#x} is not a multiple of the block size {bs:#x} "
                              f"(use e.g. size = \"{bs >> 20}M\")")
        if d.addr is not None:
            if d.addr % bs:
                raise ConfigError(f"{where}: addr {d.addr:#x} is not aligned to the block size {bs:#x}")
            spans.append((d.addr, d.addr + d.size, where))
        if d.node not in ids:
            raise ConfigError(f"{where}: node {d.node} is not a configured [[node]]; add one (ram may be empty)")
        if d.requested > d.size or d.requested % bs:
            raise ConfigError(f"{where}: requested {d.requested:#x} must be a multiple of the block size {bs:#x} "
                              f"no larger than size {d.size:#x} (the virtio-mem region)")
    if len([d for d in cfg.dimms if d.driver == "acpi"]) > cfg.slots:
        raise ConfigError(f"hotplug.slots: {cfg.slots} slots cannot hold the {len(cfg.dimms)} ACPI DIMMs")
    taken: dict[int, str] = {}
    for d in cfg.dimms:
        if d.slot is None:
            continue
        if not 0 <= d.slot < cfg.slots:
            raise ConfigError(f"dimm {d.id!r}: slot {d.slot} is not one of the {cfg.slots} slots (0-{cfg.slots - 1})")
        if d.slot in taken:
            raise ConfigError(f"dimm {d.id!r}: slot {d.slot} holds {taken[d.slot]!r} already")
        taken[d.slot] = d.id
    spans.sort()
    for (s1, e1, w1), (s2, e2, w2) in zip(spans, spans[1:]):
        if s2 < e1:
            raise ConfigError(f"{w2} overlaps {w1}; move one of them")
    rams = [(s, e) for n in cfg.nodes for s, e in n.ram]
    taken: list[tuple[int, int]] = []
    for i, r in enumerate(cfg.reserves):
        where = f"reserve[{i}]"
        if r.start % arch.page_size or r.end % arch.page_size:
            raise ConfigError(f"{where}.range: {r.start:#x}-{r.end:#x} is not page aligned ({arch.page_size:#x})")
        if not any(s <= r.start and r.end <= e for s, e in rams):
            raise ConfigError(f"{where}.range: {r.start:#x}-{r.end:#x} must lie inside one [[node]] ram range")
        if any(r.start < e and s < r.end for s, e in taken):
            raise ConfigError(f"{where}.range: {r.start:#x}-{r.end:#x} overlaps another [[reserve]]")
        taken.append((r.start, r.end))
    for n in cfg.nodes:
        fixed = sum(min(r.end, e) - max(r.start, s) for r in cfg.reserves if r.kind != "cma"
                    for s, e in n.ram if r.start < e and s < r.end)
        present = sum(e - s for s, e in n.ram)
        if fixed + n.reserved + n.used > present:
            raise ConfigError(f"node[{n.id}]: [[reserve]] ranges + reserved + used exceed its boot RAM "
                              f"({present >> 20}M)")
