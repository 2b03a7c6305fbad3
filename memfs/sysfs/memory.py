"""/sys/devices/system/memory: the attribute tables of drivers/base/memory.c."""
from __future__ import annotations

import errno

from ..machine.blocks import MEM_ONLINE, ONLINE_TYPE_NAMES, MemoryBlock
from ..machine.hotplug import Machine
from .kernfs import CONST, GLOBAL, OWNER, Dir, DynDir, Link, Node, attr_ro, attr_rw, attr_wo, bus_dir
from .parse import kstrtobool, kstrtoull, sysfs_match_string

_KOBJ_ACTIONS = ("add", "remove", "change", "move", "online", "offline", "bind", "unbind")


def _word_end(s: str, i: int, end: int, delim: str) -> int | None:
    """action_arg_word_end(): alphanumeric run from i up to delim (or the end)."""
    j = i
    while j <= end and s[j] != delim:
        if not (s[j].isascii() and s[j].isalnum()):
            return None
        j += 1
    return None if j == i else j


def parse_synth_uevent(buf: bytes) -> tuple[str, tuple[tuple[str, str], ...]]:
    """kobject_synth_uevent(): "ACTION [UUID [KEY=VALUE ...]]" -> action, extra env."""
    buf = buf.split(b"\0", 1)[0] + (b"\0" if b"\0" in buf else b"")
    text = buf.decode("latin-1")
    count = len(text)
    if count and text[-1] in "\n\0":
        count -= 1
    sp = text.find(" ", 0, count)
    first = text[:count] if sp < 0 else text[:sp]
    if not count or first not in _KOBJ_ACTIONS:
        raise OSError(errno.EINVAL, "unknown uevent action string")
    if sp < 0:
        return first, (("SYNTH_UUID", "0"),)
    args = text[sp + 1:]
    bad = OSError(errno.EINVAL, "incorrect uevent action arguments")
    if args and args[-1] in "\n\0":
        args = args[:-1]
    if len(args) < 36 or not _uuid_is_valid(args[:36]):
        raise bad
    env = [("SYNTH_UUID", args[:36])]
    nxt, end = 36, len(args) - 1
    while nxt <= end:
        if args[nxt] != " " or nxt + 1 > end:
            raise bad
        key = nxt + 1
        nxt = _word_end(args, key, end, "=")
        if nxt is None or nxt > end or args[nxt] != "=" or nxt + 1 > end:
            raise bad
        val = nxt + 1
        nxt = _word_end(args, val, end, " ")
        if nxt is None:
            raise bad
        env.append((f"SYNTH_ARG_{args[key:val - 1]}", args[val:nxt]))
    return first, tuple(env)


def _uuid_is_valid(s: str) -> bool:
    """lib/uuid.c uuid_is_valid(): 8-4-4-4-12 hex digits, either case."""
    return all((c == "-") if i in (8, 13, 18, 23) else (c in "0123456789abcdefABCDEF")
               for i, c in enumerate(s))


def block_owner(bid: int) -> tuple[str, int]:
    """The ``Attr.owner`` of memoryN's attributes: a change of block N alters only these."""
    return ("memory", bid)


def power_dir(owner: tuple[str, int] | None = None) -> Dir:
    """drivers/base/power/sysfs.c runtime-PM attributes of a device without a driver (constants)."""
    def eio() -> str:
        raise OSError(errno.EIO, "autosuspend not supported")

    def control_store(buf: bytes) -> None:
        if sysfs_match_string(("auto", "on"), buf) < 0:
            raise OSError(errno.EINVAL, "control: auto or on")

    k = {"owner": owner, "scope": CONST}
    return Dir({
        "async": attr_rw(lambda: "disabled\n", lambda b: None, **k),
        "autosuspend_delay_ms": attr_rw(eio, lambda b: eio() and None, **k),
        "control": attr_rw(lambda: "auto\n", control_store, **k),
        "runtime_active_kids": attr_ro(lambda: "0\n", **k),
        "runtime_active_time": attr_ro(lambda: "0\n", **k),
        "runtime_enabled": attr_ro(lambda: "disabled\n", **k),
        "runtime_status": attr_ro(lambda: "unsupported\n", **k),
        "runtime_suspended_time": attr_ro(lambda: "0\n", **k),
        "runtime_usage": attr_ro(lambda: "0\n", **k),
    })


def block_dir(m: Machine, mem: MemoryBlock) -> Dir:
    """One memoryN directory; every attribute dies with the block (ENODEV on open fds)."""
    alive = lambda: not mem.removed  # noqa: E731

    def state_show() -> str:
        return mem.state + "\n"

    def state_store(buf: bytes) -> None:
        online_type = sysfs_match_string(ONLINE_TYPE_NAMES, buf)
        if online_type < 0:
            raise OSError(errno.EINVAL, "state: offline, online, online_kernel or online_movable")
        m.state_store(mem.id, online_type)

    def online_show() -> str:
        with m.lock:  # the device lock: waits for a running online/offline
            return "0\n" if mem.dev_offline else "1\n"

    def online_store(buf: bytes) -> None:
        m.online_store(mem.id, kstrtobool(buf, m.profile.name))

    def valid_zones_show() -> str:
        with m.lock:
            return m.valid_zones(mem) + "\n"

    def uevent_store(buf: bytes) -> None:
        action, extra = parse_synth_uevent(buf)
        m.synth_uevent(mem.id, action, extra)

    def valid_zones_scope() -> str:
        # an online block shows its own zone; an offline one what zone_for_pfn_range()
        # would pick, which depends on the zones (and auto-movable stats) of the node
        return OWNER if mem.state == MEM_ONLINE else GLOBAL

    # owner: what the FUSE adapter keys its cached texts by; scope: what each text
    # depends on (memory_block_change_state() alters state/online of this block only)
    own = block_owner(mem.id)
    entries: dict[str, Node] = {
        "phys_index": attr_ro(lambda: f"{mem.id:08x}\n", alive, owner=own, scope=CONST),
        "state": attr_rw(state_show, state_store, alive, owner=own, scope=OWNER),
        "online": attr_rw(online_show, online_store, alive, owner=own, scope=OWNER),
        "phys_device": attr_ro(lambda: "0\n", alive, owner=own, scope=CONST),
        "removable": attr_ro(lambda: "1\n", alive, owner=own, scope=CONST),
        "valid_zones": attr_ro(valid_zones_show, alive, owner=own, scope=valid_zones_scope),
        "uevent": attr_rw(lambda: "", uevent_store, alive, owner=own, scope=CONST),
        "power": power_dir(own),
        "subsystem": Link("../../../../bus/memory"),
    }
    for nid in mem.nids:
        entries[f"node{nid}"] = Link(f"../../node/node{nid}")
    if mem.device is not None and mem.device.slot is not None:
        entries["firmware_node"] = Link(f"../../../{acpi_devpath(mem.device.slot)}")
    return Dir(entries)


def acpi_devpath(slot: int) -> str:
    """Where QEMU's PC machine puts the memory devices in the ACPI namespace."""
    return f"LNXSYSTM:00/LNXSYBUS:00/PNP0A06:04/PNP0C80:{slot:02x}"


class BlockDirs:
    """memoryN directories built on first lookup, dropped when the block goes."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.cache: dict[int, tuple[MemoryBlock, Dir]] = {}

    def lookup(self, name: str) -> Dir | None:
        if not name.startswith("memory"):
            return None
        digits = name[6:]
        if not (digits.isascii() and digits.isdigit()) or (digits[0] == "0" and len(digits) > 1):
            return None
        bid = int(digits)
        mem = self.m.blocks.get(bid)
        if mem is None:
            return None
        hit = self.cache.get(bid)
        if hit is not None and hit[0] is mem:
            return hit[1]
        d = block_dir(self.m, mem)
        self.cache[bid] = (mem, d)
        return d

    def names(self) -> list[str]:
        return [f"memory{b}" for b in self.m.block_ids()]


def memory_root(m: Machine, blocks: BlockDirs) -> DynDir:
    def auto_online_store(buf: bytes) -> None:
        i = sysfs_match_string(ONLINE_TYPE_NAMES, buf)
        if i < 0:
            raise OSError(errno.EINVAL, "auto_online_blocks: offline, online, online_kernel or online_movable")
        m.set_auto_online_blocks(ONLINE_TYPE_NAMES[i])

    def root_uevent_store(buf: bytes) -> None:
        parse_synth_uevent(buf)  # valid actions are accepted; the root device's event is filtered

    def probe_store(buf: bytes) -> None:
        m.probe_store(kstrtoull(buf, 0))

    def offline_page(soft: bool):
        def store(buf: bytes) -> None:
            m.memory_failure(kstrtoull(buf, 0), soft)
        return store

    fixed: dict[str, Node] = {
        "auto_online_blocks": attr_rw(lambda: m.auto_online_blocks + "\n", auto_online_store),
        "block_size_bytes": attr_ro(lambda: f"{m.block_size:x}\n", scope=CONST),
        "hard_offline_page": attr_wo(offline_page(False)),
        "power": power_dir(),
        "soft_offline_page": attr_wo(offline_page(True)),
        "uevent": attr_rw(lambda: "", root_uevent_store, scope=CONST),
    }
    if m.cfg.probe:
        fixed["probe"] = attr_wo(probe_store)
    if m.profile.crash_hotplug:
        fixed["crash_hotplug"] = attr_ro(lambda: "0\n", scope=CONST)
    order = sorted(fixed)

    def names() -> list[str]:
        return order + blocks.names()

    def lookup(name: str) -> Node | None:
        node = fixed.get(name)
        return node if node is not None else blocks.lookup(name)

    return DynDir(names, lookup)


def bus_memory(m: Machine) -> Dir:
    """/sys/bus/memory: devices/memoryN links plus the bus's own files."""
    def lookup(name: str) -> Node | None:
        if name.startswith("memory") and name[6:].isascii() and name[6:].isdigit() and int(name[6:]) in m.blocks \
                and str(int(name[6:])) == name[6:]:
            return Link(f"../../../devices/system/memory/{name}")
        return None

    return bus_dir(DynDir(lambda: [f"memory{b}" for b in m.block_ids()], lookup))

