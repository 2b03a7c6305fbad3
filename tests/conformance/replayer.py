"""Drive a memfs Machine through a reference trace and compare it with the real kernel.

Writes go through the sysfs attribute tables (the same store functions the FUSE mount
calls), host steps through the model's plug/unplug (QEMU device_add / device_del).
`Replayer.check(dump)` returns the list of differences against one dump of the trace.
"""
from __future__ import annotations

import errno
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

from memfs.machine.config import DimmConfig, load_config
from memfs.machine.hotplug import Machine
from memfs.machine.profiles import PROFILES, resolve_kernel
from memfs.sysfs.kernfs import Attr, Link, Tree
from memfs.sysfs.tree import build_tree

from .traces import Dump, HostAdd, HostDel, HostResize, Trace, Write

ZONES = ("DMA", "DMA32", "Normal", "Movable")
#: the uevents memfs models; the traces also hold module, bus, driver, virtio and pci ones
UEVENT_SUBSYSTEMS = ("memory", "container")


#: machine descriptions of the reference guests that are not the embedded default
MACHINES = {"aarch64": Path(__file__).resolve().parent / "machines" / "arm64-virt-6.1.toml"}


def machine_for(trace: Trace) -> Machine:
    """The reference VM: the embedded default machine (x86_64) or the arm64 guest's
    description, with the trace's command line and cold-plugged DIMMs."""
    h = trace.header
    memmap: bool | str = h.memmap_on_memory
    if (h.kernel_params.get("memory_hotplug.memmap_on_memory") or "").lower() == "force":
        # 6.6+ parses "force"; older kernels' param_set_bool rejects it and the parameter
        # keeps its default, off (the 6.1 trace g reads N)
        memmap = "force" if PROFILES[resolve_kernel(h.kernel_version or "6.1")[0]].memmap_force else False
    overrides = {"boot.memmap_on_memory": memmap,
                 "boot.memhp_default_state": h.memhp_default_state or "offline"}
    arch = h.uname.split()[-2] if h.uname else "x86_64"
    cfg = load_config(MACHINES.get(arch), overrides=overrides, kernel=h.kernel_version)
    cfg.dimms = [DimmConfig(id=i, size=s) for i, s in trace.cold_dimms]
    cfg.dimms += [DimmConfig(id=v.id, size=v.size, node=v.node or 0, driver="virtio_mem", requested=v.requested)
                  for v in trace.cold_virtio_mem]
    return Machine(cfg)


def resolve(tree: Tree, path: str, follow_last: bool = True):
    """Path walk that follows symlinks like the VFS (FUSE does this with readlink)."""
    parts = [p for p in path.split("/") if p]
    cur: list[str] = []
    for i, name in enumerate(parts):
        node = tree.resolve("/" + "/".join(cur + [name]))
        if isinstance(node, Link) and (follow_last or i < len(parts) - 1):
            target = posixpath.normpath(posixpath.join("/" + "/".join(cur), node.target))
            return resolve(tree, target + "".join("/" + p for p in parts[i + 1:]), follow_last)
        cur.append(name)
    return tree.resolve("/" + "/".join(cur))


@dataclass
class Replayer:
    trace: Trace
    machine: Machine = field(init=False)
    tree: Tree = field(init=False)
    pinned: list[str] = field(default_factory=list)
    #: uevents of these DEVPATH prefixes are left out of the comparison, on both sides
    ignore_devpaths: tuple[str, ...] = ()
    seq0: int = 0
    kernel_seq0: int | None = None

    def __post_init__(self) -> None:
        self.machine = machine_for(self.trace)
        self.tree = build_tree(self.machine)
        self.seq0 = self.machine.events.seqnum

    # -------------------------------------------------------------- actions
    def read(self, path: str) -> str:
        node = resolve(self.tree, path)
        assert isinstance(node, Attr) and node.readable, path
        return node.show()

    def write(self, w: Write) -> tuple[int | None, bool]:
        """(errno or None, at_open) as the shell would see them."""
        try:
            node = resolve(self.tree, w.path)
        except OSError as e:
            return e.errno, True
        if not isinstance(node, Attr) or not node.writable:
            return errno.EACCES, True
        try:
            node.store(w.data)
        except OSError as e:
            return e.errno, False
        return None, False

    def pin_kernel_allocation(self, block: str) -> None:
        """The kernel put its own (unmovable) allocations into this block as soon as it
        was onlined into the empty Normal zone: reproduce that with an unmovable page."""
        bid = int(block[len("memory"):])
        m = self.machine
        blk = m.blocks[bid]
        on_pcp = sum(blk.allocs.get(a, 0) for a in m.pcp_lists)  # free pages on per-cpu lists
        if not (blk.unmovable > on_pcp or blk.reserved or blk.cma):  # nothing there that isolation refuses
            self.machine.alloc("unmovable", self.machine.page_size, block_id=bid)
            self.pinned.append(block)

    def apply(self, step) -> list[str]:
        """Run one non-dump step; returns differences in write results."""
        if isinstance(step, Write):
            if (step.errno == errno.EBUSY and step.attr == "state" and step.block
                    and step.value == "offline"):
                self.pin_kernel_allocation(step.block)
            got, at_open = self.write(step)
            if step.rc and step.errno is None:
                # busybox's printf fails a write with status 1 and no message (the arm64
                # trace's `printf online_movable > state`): a failure, errno unrecorded
                if got is None:
                    return [f"write {step.value!r} > {step.path}: kernel failed (errno not recorded), memfs ok"]
            elif got != step.errno or (got is not None and at_open != step.at_open):
                return [f"write {step.value!r} > {step.path}: kernel "
                        f"{errno.errorcode.get(step.errno, 'ok') if step.errno else 'ok'}"
                        f"{' (open)' if step.at_open else ''}, memfs "
                        f"{errno.errorcode.get(got, 'ok') if got else 'ok'}{' (open)' if at_open else ''}"]
        elif isinstance(step, HostAdd):
            self.machine.plug(step.size, node=step.node or 0, dev_id=step.dimm_id)
        elif isinstance(step, HostDel):
            self.machine.unplug(step.dimm_id)
        elif isinstance(step, HostResize):
            self.machine.resize(step.device, step.requested)
        return []

    # -------------------------------------------------------------- comparison
    def check(self, dump: Dump) -> list[str]:
        diffs: list[str] = []
        m = self.machine
        want = set(dump.blocks)
        have = {f"memory{b}" for b in m.block_ids()}
        if want != have:
            diffs.append(f"blocks: kernel {sorted(want - have)} extra, memfs {sorted(have - want)} extra")
        for block in sorted(want & have):
            files = dump.block_files(block)
            for attr, text in files.items():
                mine = self.read(f"/sys/devices/system/memory/{block}/{attr}").rstrip("\n")
                if mine != text:
                    diffs.append(f"{block}/{attr}: kernel {text!r}, memfs {mine!r}")
            for name, target in dump.block_links(block).items():
                node = self.tree.resolve(f"/sys/devices/system/memory/{block}/{name}")
                if not isinstance(node, Link) or node.target != target:
                    diffs.append(f"{block}/{name} -> kernel {target!r}, memfs {getattr(node, 'target', node)!r}")
            mine_links = {n for n, x in resolve(self.tree, f"/sys/devices/system/memory/{block}").entries()
                          if isinstance(x, Link)}
            if mine_links != set(dump.block_links(block)):
                diffs.append(f"{block} links: kernel {sorted(dump.block_links(block))}, memfs {sorted(mine_links)}")
        node0 = m.nodes[0]
        for zname in ZONES:
            k = dump.zones.get(zname, {})
            z = node0.zone(zname)
            mine = {"spanned": z.spanned, "present": z.present, "managed": z.managed,
                    "start_pfn": z.start_pfn if z.populated() else None}
            for key, val in mine.items():
                if key in k and k[key] != val:
                    diffs.append(f"zone {zname} {key}: kernel {k[key]}, memfs {val}")
        mi = m.meminfo()
        if dump.mem_total != mi["MemTotal"]:
            diffs.append(f"MemTotal: kernel {dump.mem_total}, memfs {mi['MemTotal']}")
        for name, text in dump.params.items():
            mine = self.read(f"/sys/module/memory_hotplug/parameters/{name}").rstrip("\n")
            if mine != text:
                diffs.append(f"param {name}: kernel {text!r}, memfs {mine!r}")
        for name, text in dump.memory_top.items():
            if isinstance(text, str):
                mine = self.read(f"/sys/devices/system/memory/{name}").rstrip("\n")
                if mine != text:
                    diffs.append(f"memory/{name}: kernel {text!r}, memfs {mine!r}")
        for slot, info in dump.acpi.items():
            status = self.read(f"/sys/bus/acpi/devices/{slot}/status").rstrip("\n")
            if str(info.get("status")) != status:
                diffs.append(f"{slot}/status: kernel {info.get('status')}, memfs {status}")
            mine_blocks = [t.rsplit("/", 1)[-1] for _, t in sorted(
                (n, x.target) for n, x in resolve(self.tree, f"/sys/bus/acpi/devices/{slot}").entries()
                if isinstance(x, Link))]
            if sorted(info.get("blocks", [])) != sorted(mine_blocks):
                diffs.append(f"{slot} blocks: kernel {info.get('blocks')}, memfs {mine_blocks}")
        for name, text in dump.node_links.items():
            # the memory block links (6.12+ also has a memory_failure/ directory there)
            text = [n for n in text if re.fullmatch(r"memory\d+", n)]
            mine = sorted(n for n in resolve(self.tree, f"/sys/devices/system/node/{name}").names()
                          if re.fullmatch(r"memory\d+", n))
            if sorted(text) != mine:
                diffs.append(f"{name} links: kernel {text}, memfs {mine}")
        diffs += self._check_uevents(dump)
        return diffs

    def _check_uevents(self, dump: Dump) -> list[str]:
        """Same actions on the same devices in the same order; SEQNUMs consecutive alike."""
        mine = self.machine.events.since(self.seq0)
        self.seq0 = self.machine.events.seqnum
        mine = [e for e in mine if not e.devpath.startswith(self.ignore_devpaths)]
        kernel = [u for u in dump.uevents if u.get("SUBSYSTEM") in UEVENT_SUBSYSTEMS
                  and not u["DEVPATH"].startswith(self.ignore_devpaths)]
        got = [(e.action, e.devpath) for e in mine]
        want = [(u["ACTION"], u["DEVPATH"]) for u in kernel]
        if got != want:
            return [f"uevents: kernel {want}, memfs {got}"]
        if kernel and not self.ignore_devpaths:
            k = [u["SEQNUM"] - kernel[0]["SEQNUM"] for u in kernel]
            g = [e.seqnum - mine[0].seqnum for e in mine]
            if k != g:
                return [f"uevent SEQNUM steps: kernel {k}, memfs {g}"]
        return []


def replay(trace: Trace, check: bool = True) -> tuple[Replayer, list[str], list[tuple[Dump, int]]]:
    """Run the whole trace through a fresh Replayer: (replayer, differences found at every
    dump unless ``check`` is False, [(dump, memfs MemFree in kB)])."""
    r = Replayer(trace)
    problems: list[str] = []
    free: list[tuple[Dump, int]] = []
    for actions, dump in trace.segments():
        for step in actions:
            problems += [f"before dump {dump.step}: {d}" for d in r.apply(step)]
        if check:
            problems += [f"dump {dump.step} ({dump.label}): {d}" for d in r.check(dump)]
        free.append((dump, r.machine.meminfo()["MemFree"]))
    for step in trace.trailing_steps():
        problems += r.apply(step)
    return r, problems, free

