"""Loader for the reference traces recorded on real kernels (Debian 6.1, 6.12, 7.2 under QEMU).

Turns ``<traces>/<name>/trace.json[.xz]`` (made by the harness's parse_trace.py from the
guest's data port) plus ``run-meta.json`` (the exact QEMU argv) into a
normalized, ordered list of steps that a replayer can drive through the
model or through a FUSE mount and compare:

* ``Write``     one ``echo VALUE > PATH`` (or ``printf``) by the guest, with the
                exit status and the errno busybox printed
* ``HostAdd``   a QMP hot-add of a pc-dimm (object-add + device_add)
* ``HostDel``   a QMP ``device_del`` of a pc-dimm
* ``WaitGone``  the guest waited for a path to vanish (after an eject/device_del)
* ``Waited``    the guest waited for the number of memory blocks to change
* ``Note``      a free-text note of the scenario script
* ``Dump``      a full state dump (sysfs files, links, zoneinfo, meminfo, uevents)
* ``Listing``   an ``ls -la`` (probe trace only), ``Output`` stray output lines

This module has no dependency on the rest of memfs (so it can be used to check
the emulator from the outside).

Where the traces are: in the repository, ``tests/conformance/data/<kernel>/<scenario>/``
(``trace.json.xz`` + ``run-meta.json``; kernels ``6.1``, ``6.12``, ``7.2``, ``arm64-6.1``;
see docs/conformance.md). ``$MEMFS_REFERENCE`` points the loader at a fresh recording
instead: a folder laid out like ``tests/conformance/data``, or the harness's own output
(``traces/`` for 6.1, ``traces-<kernel>/`` for the others), or for 6.1 the ``traces``
folder itself; a wrong setting means "absent", there is no fallback. Data that is
absent is an error (FileNotFoundError), never a skip: a clone without its traces
proves nothing.

Conventions worth knowing when comparing (see also TRACES.md):

* file texts in a dump are what ``v=$(cat f)`` kept: **trailing newlines are
  stripped** (``state`` reads "online\\n" on the kernel, the dump says
  "online"); an empty file is "".
* ``Write.data`` is the exact byte string the guest wrote (``echo`` appends
  "\\n", ``printf`` does not); ``echo "" > f`` writes a single "\\n".
* uevents: the guest's busybox logger also printed ``@@UEVVAR scenario=ab``
  (init's own environment, not a kernel variable); it is dropped.  SEQNUM is an
  int.
"""
from __future__ import annotations

import errno as _errno
import json
import lzma
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

__all__ = [
    "TRACE_A",
    "TRACE_B",
    "DATA",
    "KERNELS",
    "EXPECTED",
    "traces_dir",
    "trace_names",
    "have_trace",
    "load_trace",
    "parse_size",
    "errno_from_strerror",
    "Header",
    "Write",
    "HostAdd",
    "HostDel",
    "HostResize",
    "VirtioMem",
    "WaitGone",
    "Waited",
    "Note",
    "Output",
    "Listing",
    "Marker",
    "Dump",
    "Trace",
    "Step",
]

TRACE_A = "a_memmap_on"
TRACE_B = "b_memmap_off"

MEMORY = "/sys/devices/system/memory"
PARAMS = "/sys/module/memory_hotplug/parameters"
NODE = "/sys/devices/system/node"
ACPI = "/sys/bus/acpi/devices"


# --------------------------------------------------------------------------
# locating traces
# --------------------------------------------------------------------------

#: the conformance data shipped with memfs
DATA = Path(__file__).resolve().parent.parent / "conformance" / "data"
#: every kernel recorded, and the scenarios the repository must hold for it
EXPECTED: dict[str, tuple[str, ...]] = {
    "6.1": ("a_memmap_on", "b_memmap_off", "f_virtio_mem", "g_memmap_force", "probe"),
    "6.12": ("a_memmap_on", "b_memmap_off", "f_virtio_mem", "g_memmap_force"),
    "7.2": ("a_memmap_on", "b_memmap_off", "f_virtio_mem", "g_memmap_force"),
    "arm64-6.1": ("a_memmap_on", "b_memmap_off"),
}
KERNELS = tuple(EXPECTED)


def _has_traces(d: Path) -> bool:
    return d.is_dir() and any(_trace_file(x) is not None for x in d.iterdir() if x.is_dir())


def _trace_file(d: Path) -> Optional[Path]:
    for n in ("trace.json", "trace.json.xz"):
        if (d / n).is_file():
            return d / n
    return None


def traces_dir(kernel: str = "6.1") -> Optional[Path]:
    """The directory holding one subdirectory per trace of ``kernel``, or None if absent."""
    env = os.environ.get("MEMFS_REFERENCE")
    if env:
        # an explicit setting wins; if it is wrong the traces count as absent
        p = Path(env)
        harness = "traces" if kernel == "6.1" else f"traces-{kernel}"
        candidates = [p / kernel, p / harness] + ([p] if kernel == "6.1" else [])
    else:
        candidates = [DATA / kernel]
    for c in candidates:
        if _has_traces(c):
            return c
    return None


def trace_names(kernel: str = "6.1") -> list[str]:
    d = traces_dir(kernel)
    if d is None:
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and _trace_file(p) is not None)


def _resolve(name: str, kernel: str = "6.1") -> Path:
    d = traces_dir(kernel)
    if d is None:
        where = f"$MEMFS_REFERENCE={os.environ['MEMFS_REFERENCE']}" if os.environ.get("MEMFS_REFERENCE") \
            else str(DATA / kernel)
        raise FileNotFoundError(f"no traces of kernel {kernel} in {where} (docs/conformance.md: recording traces)")
    p = d / name
    if _trace_file(p) is not None:
        return p
    # short alias: "a" -> "a_memmap_on"
    matches = [q for q in d.iterdir() if q.name.startswith(name + "_") and _trace_file(q) is not None]
    if len(matches) == 1:
        return matches[0]
    raise FileNotFoundError(f"no trace {name!r} of kernel {kernel} in {d}")


def have_trace(name: str, kernel: str = "6.1") -> bool:
    try:
        _resolve(name, kernel)
        return True
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------
# small parsers
# --------------------------------------------------------------------------

_SIZE_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}


def parse_size(v: Union[int, str]) -> int:
    """QEMU size syntax: an int, or a number with an optional K/M/G/T/P/E suffix
    (binary units, case-insensitive)."""
    if isinstance(v, int):
        return v
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]?)\s*", str(v))
    if not m:
        raise ValueError(f"bad size {v!r}")
    mult = _SIZE_SUFFIX.get(m.group(2).upper())
    if mult is None:
        raise ValueError(f"bad size suffix in {v!r}")
    num = m.group(1)
    return int(float(num) * mult) if "." in num else int(num) * mult


# errno texts as glibc's strerror() prints them (busybox-static is glibc-linked
# on Debian); checked before the host's own os.strerror table.
_STRERROR = {
    "Operation not permitted": _errno.EPERM,
    "No such file or directory": _errno.ENOENT,
    "Interrupted system call": _errno.EINTR,
    "Input/output error": _errno.EIO,
    "No such device or address": _errno.ENXIO,
    "Argument list too long": _errno.E2BIG,
    "Cannot allocate memory": _errno.ENOMEM,
    "Permission denied": _errno.EACCES,
    "Device or resource busy": _errno.EBUSY,
    "File exists": _errno.EEXIST,
    "No such device": _errno.ENODEV,
    "Invalid argument": _errno.EINVAL,
    "Numerical result out of range": _errno.ERANGE,
    "Operation not supported": _errno.EOPNOTSUPP,
    "Read-only file system": _errno.EROFS,
    "Is a directory": _errno.EISDIR,
    "Not a directory": _errno.ENOTDIR,
    "Memory page has hardware error": getattr(_errno, "EHWPOISON", 133),
    "Function not implemented": _errno.ENOSYS,
    "Bad address": _errno.EFAULT,
}


def errno_from_strerror(text: str) -> int:
    text = text.strip()
    if text in _STRERROR:
        return _STRERROR[text]
    for code in _errno.errorcode:
        if os.strerror(code) == text:
            return code
    raise ValueError(f"unknown strerror text {text!r}")


_WRITE_ERR = re.compile(r"(?:^|: )write error: (?P<msg>[^:]+)$")
_CREATE_ERR = re.compile(r"can't create (?P<path>.+): (?P<msg>[^:]+)$")
_OPEN_ERR = re.compile(r"can't open '?(?P<path>.+?)'?: (?P<msg>[^:]+)$")


def _classify_error(err: str) -> tuple[Optional[int], bool]:
    """busybox stderr of a failed redirection/write -> (errno, at_open)."""
    err = err.strip()
    if not err:
        return None, False
    m = _CREATE_ERR.search(err)
    if m:
        return errno_from_strerror(m.group("msg")), True
    m = _WRITE_ERR.search(err)
    if m:
        return errno_from_strerror(m.group("msg")), False
    m = _OPEN_ERR.search(err)
    if m:
        return errno_from_strerror(m.group("msg")), True
    raise ValueError(f"unrecognised shell error text {err!r}")


def _kernel_bool(v: Optional[str]) -> bool:
    """Boot-parameter truth value as kstrtobool sees it (plus 6.6's 'force');
    a bare flag (None) means on; unparsable means off (the param stays at its
    default, which is off)."""
    if v is None:
        return True
    if v.lower() == "force":
        return True
    if v[:1] in ("y", "Y", "1", "t", "T"):
        return True
    if v[:2].lower() == "on":
        return True
    return False


# --------------------------------------------------------------------------
# step types
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    scenario: str
    cmdline: str
    uname: str
    #: ``memory_hotplug.memmap_on_memory`` from the kernel command line (default False)
    memmap_on_memory: bool
    #: ``memhp_default_state=`` from the command line, None if not given
    memhp_default_state: Optional[str]
    #: the exact QEMU argv from run-meta.json (``$WORK`` left unexpanded)
    qemu_args: list[str]
    #: every ``key[=value]`` of the kernel command line (value None for a bare flag)
    kernel_params: dict[str, Optional[str]] = field(default_factory=dict)
    #: ``-m`` boot RAM in bytes, number of DIMM slots and maxmem (None if absent)
    boot_mem: Optional[int] = None
    slots: Optional[int] = None
    maxmem: Optional[int] = None
    #: numa node of each cold-plugged DIMM (None: not given on the QEMU line)
    cold_dimm_nodes: dict[str, Optional[int]] = field(default_factory=dict)

    @property
    def kernel_version(self) -> Optional[str]:
        """major.minor of the recorded kernel (``6.1.0-56-amd64`` -> 6.1,
        ``6.12.117+deb13-amd64`` -> 6.12)."""
        m = re.search(r"\b(\d+\.\d+)\.\d+[-+]", self.uname)
        return m.group(1) if m else None

    @property
    def release(self) -> Optional[str]:
        """The release string as ``uname -r`` prints it (``7.2.13+deb14-amd64``)."""
        parts = self.uname.split()
        return parts[2] if len(parts) > 2 else None


@dataclass(frozen=True)
class Write:
    path: str
    #: the shell argument (without the newline that echo adds)
    value: str
    #: True for ``echo`` (a "\n" was appended), False for ``printf '%s'``
    newline: bool
    #: shell exit status (0 or 1)
    rc: int
    #: errno of the failure, None on success (and for a failed printf, which prints no
    #: error: check ``rc``)
    errno: Optional[int]
    #: True when open(2) failed ("can't create PATH: ..."), False for a failed write(2)
    at_open: bool = False
    #: the shell's stderr, verbatim
    err: str = ""

    @property
    def data(self) -> bytes:
        """The exact bytes passed to write(2)."""
        return self.value.encode() + (b"\n" if self.newline else b"")

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def block(self) -> Optional[str]:
        m = re.match(re.escape(MEMORY) + r"/(memory\d+)/", self.path)
        return m.group(1) if m else None

    @property
    def attr(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def errname(self) -> Optional[str]:
        return None if self.errno is None else _errno.errorcode.get(self.errno, str(self.errno))


@dataclass(frozen=True)
class HostAdd:
    """QMP hot-add of a pc-dimm: ``object-add`` memory-backend-ram (size) followed by
    ``device_add`` pc-dimm (id, memdev, optional node)."""

    dimm_id: str
    size: int
    node: Optional[int] = None
    memdev: Optional[str] = None
    tag: str = ""


@dataclass(frozen=True)
class HostDel:
    """QMP ``device_del`` of a pc-dimm (the guest kernel offlines what is online,
    then removes the blocks; see TRACES.md)."""

    dimm_id: str
    tag: str = ""


@dataclass(frozen=True)
class HostResize:
    """QMP ``qom-set DEV requested-size N`` of a virtio-mem device: the guest's driver
    plugs or unplugs memory blocks towards the new size."""

    device: str
    requested: int
    tag: str = ""


@dataclass(frozen=True)
class VirtioMem:
    """A cold-plugged ``-device virtio-mem-pci``: region size (its memdev) and the
    requested size at boot."""

    id: str
    size: int
    requested: int
    node: Optional[int] = None


@dataclass(frozen=True)
class WaitGone:
    """The guest polled (every 0.1 s, ``tenths`` times) until ``path`` vanished;
    ``gone`` False means it was still present at the time limit."""

    path: str
    gone: bool
    tenths: int

    @property
    def block(self) -> Optional[str]:
        m = re.match(re.escape(MEMORY) + r"/(memory\d+)$", self.path)
        return m.group(1) if m else None


@dataclass(frozen=True)
class Waited:
    """The guest polled until the number of memoryN directories changed (``before`` ->
    ``now``), or until ``cond`` held on that number ``$n`` (f.sh; ``before`` is None)."""

    before: Optional[int]
    now: int
    tenths: int
    cond: Optional[str] = None


@dataclass(frozen=True)
class Note:
    text: str


@dataclass(frozen=True)
class Output:
    text: str


@dataclass(frozen=True)
class Listing:
    """``ls -la PATH`` (probe trace).  ``entries``: name -> {mode, size, target}."""

    path: str
    lines: list[str]
    entries: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Marker:
    """Any other ``@@KIND text`` line of the data port that is not part of the header."""

    kind: str
    text: str


@dataclass
class Dump:
    step: int
    label: str
    uptime: Optional[float]
    #: memoryN -> {file name: text} for state, online, valid_zones, phys_index,
    #: phys_device, removable, uevent; the directory's symlinks are in the same
    #: dict under their own names (node0, subsystem, firmware_node) with the
    #: link target as value.  A file whose read failed maps to None.
    blocks: dict[str, dict[str, Optional[str]]]
    #: node 0 zone name -> {spanned, present, managed, free, start_pfn}
    #: (start_pfn None when zoneinfo printed none, i.e. unpopulated zone)
    zones: dict[str, dict[str, Optional[int]]]
    #: every node: node id -> zone name -> counters as above
    node_zones: dict[int, dict[str, dict[str, Optional[int]]]]
    #: /proc/meminfo, kB (MemTotal, MemFree, ...)
    meminfo: dict[str, int]
    #: "node0" -> /sys/devices/system/node/node0/meminfo (kB, "Node 0 " prefix removed)
    node_meminfo: dict[str, dict[str, int]]
    #: kernel uevents since the previous dump: {ACTION, DEVPATH, SUBSYSTEM, SEQNUM(int)}
    uevents: list[dict[str, Any]]
    #: /sys/module/memory_hotplug/parameters/* -> text
    params: dict[str, Optional[str]]
    #: /sys/devices/system/memory/<file> -> text (None if the read failed)
    memory_top: dict[str, Optional[str]]
    #: "PNP0C80:NN" -> {status, path, physical_node: {link name: target}, blocks: [memoryN]}
    acpi: dict[str, dict[str, Any]]
    #: /sys/devices/system/node/{online,possible,has_memory,has_normal_memory,has_cpu}
    node_state: dict[str, Optional[str]]
    #: "node0" -> memoryN entries of /sys/devices/system/node/node0 (sorted numerically)
    node_links: dict[str, list[str]]
    #: raw path -> {rc, text}  (rc = cat's exit status; text: stdout, or the error)
    files: dict[str, dict[str, Any]]
    #: raw link path -> target
    links: dict[str, str]
    #: path -> errno for every file whose read failed (e.g. soft_offline_page: EACCES)
    read_errors: dict[str, int]
    dmesg: list[str]
    iomem_ram: list[str]
    vmstat_memmap: list[str]

    # ---- helpers
    def block_links(self, block: str) -> dict[str, str]:
        pre = f"{MEMORY}/{block}/"
        return {p[len(pre):]: t for p, t in self.links.items() if p.startswith(pre)}

    def block_files(self, block: str) -> dict[str, Optional[str]]:
        links = self.block_links(block)
        return {k: v for k, v in self.blocks.get(block, {}).items() if k not in links}

    def state(self, block: str) -> Optional[str]:
        b = self.blocks.get(block)
        return None if b is None else b.get("state")

    def online_blocks(self) -> list[str]:
        return [b for b, v in self.blocks.items() if v.get("state") == "online"]

    def offline_blocks(self) -> list[str]:
        return [b for b, v in self.blocks.items() if v.get("state") == "offline"]

    @property
    def mem_total(self) -> Optional[int]:
        return self.meminfo.get("MemTotal")

    @property
    def mem_free(self) -> Optional[int]:
        return self.meminfo.get("MemFree")

    def uevent_actions(self) -> list[tuple[str, str]]:
        """[(ACTION, memoryN or DEVPATH)] in order."""
        out = []
        for u in self.uevents:
            dp = u.get("DEVPATH", "")
            out.append((u.get("ACTION", ""), dp.rsplit("/", 1)[-1] if dp.startswith("/devices/system/memory/") else dp))
        return out


Step = Union[Write, HostAdd, HostDel, HostResize, WaitGone, Waited, Note, Output, Listing, Marker, Dump]


@dataclass
class Trace:
    name: str
    path: Path
    header: Header
    steps: list[Step]
    #: cold-plugged DIMMs from the QEMU argv, in order: [(dimm id, size in bytes)]
    cold_dimms: list[tuple[str, int]]
    #: cold-plugged virtio-mem devices (QEMU argv)
    cold_virtio_mem: list[VirtioMem]
    #: the guest script ran to the end (@@SCENARIO_DONE seen)
    completed: bool
    #: every @@HOST request verbatim, including ignored ones: [(tag, qmp dict)]
    host_requests: list[tuple[str, dict]]
    #: run-meta.json verbatim
    meta: dict
    #: the kernel folder it was loaded from (``6.1``, ``6.12``, ``7.2``, ``arm64-6.1``)
    kernel: str = "6.1"

    def dumps(self) -> list[Dump]:
        return [s for s in self.steps if isinstance(s, Dump)]

    def writes(self) -> list[Write]:
        return [s for s in self.steps if isinstance(s, Write)]

    def host_steps(self) -> list[Union[HostAdd, HostDel]]:
        return [s for s in self.steps if isinstance(s, (HostAdd, HostDel))]

    def notes(self) -> list[Note]:
        return [s for s in self.steps if isinstance(s, Note)]

    def of_type(self, cls: type) -> list:
        return [s for s in self.steps if isinstance(s, cls)]

    def dump(self, step: int) -> Dump:
        for d in self.dumps():
            if d.step == step:
                return d
        raise KeyError(step)

    @property
    def boot(self) -> Dump:
        return self.dumps()[0]

    def segments(self) -> Iterator[tuple[list[Step], Dump]]:
        """Yield (actions since the previous dump, dump).  Actions are every
        non-Dump step; steps after the last dump are not yielded."""
        pending: list[Step] = []
        for s in self.steps:
            if isinstance(s, Dump):
                yield pending, s
                pending = []
            else:
                pending.append(s)

    def trailing_steps(self) -> list[Step]:
        """Steps after the last dump."""
        out: list[Step] = []
        for s in self.steps:
            out = [] if isinstance(s, Dump) else out + [s]
        return out


# --------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------

def _parse_zoneinfo(text: str) -> dict[int, dict[str, dict[str, Optional[int]]]]:
    out: dict[int, dict[str, dict[str, Optional[int]]]] = {}
    cur: Optional[dict[str, Optional[int]]] = None
    for ln in text.splitlines():
        m = re.match(r"Node (\d+), zone\s+(\S+)", ln)
        if m:
            cur = {"spanned": None, "present": None, "managed": None, "free": None, "start_pfn": None}
            out.setdefault(int(m.group(1)), {})[m.group(2)] = cur
            continue
        if cur is None:
            continue
        s = ln.split()
        if len(s) == 2 and s[0] in ("spanned", "present", "managed") and s[1].isdigit():
            cur[s[0]] = int(s[1])
        elif len(s) == 2 and s[0] == "start_pfn:" and s[1].isdigit():
            cur["start_pfn"] = int(s[1])
        elif len(s) == 3 and s[0] == "pages" and s[1] == "free" and s[2].isdigit():
            cur["free"] = int(s[2])
    return out


def _parse_meminfo(text: str) -> dict[str, int]:
    d = {}
    for ln in text.splitlines():
        m = re.match(r"(?:Node \d+ )?([\w()]+):\s+(\d+)", ln)
        if m:
            d[m.group(1)] = int(m.group(2))
    return d


def _uevents(lines: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for ln in lines:
        if ln.startswith("@@UEV "):
            ev: dict[str, Any] = {}
            for tok in ln[len("@@UEV "):].split(" "):
                k, _, v = tok.partition("=")
                if k:
                    ev[k] = v
            if "SEQNUM" in ev and str(ev["SEQNUM"]).isdigit():
                ev["SEQNUM"] = int(ev["SEQNUM"])
            out.append(ev)
        elif ln.startswith("@@UEVVAR "):
            k, _, v = ln[len("@@UEVVAR "):].partition("=")
            if k == "scenario" or not out:
                continue  # init's own environment, not a kernel variable
            out[-1][k] = v
        elif ln.strip():
            raise ValueError(f"unexpected uevent log line {ln!r}")
    return out


def _blocknum(name: str) -> int:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else -1


def _read_errno(text: str) -> Optional[int]:
    try:
        e, _ = _classify_error(text)
        return e
    except ValueError:
        return None


def _build_dump(ev: dict) -> Dump:
    files: dict[str, dict[str, Any]] = {p: {"rc": v["rc"], "text": v["text"]} for p, v in ev["files"].items()}
    links: dict[str, str] = dict(ev.get("links", {}))

    def text(p: str) -> Optional[str]:
        v = files[p]
        return v["text"] if v["rc"] == 0 else None

    read_errors = {}
    for p, v in files.items():
        if v["rc"] != 0:
            e = _read_errno(v["text"])
            if e is not None:
                read_errors[p] = e

    blocks: dict[str, dict[str, Optional[str]]] = {}
    memory_top: dict[str, Optional[str]] = {}
    params: dict[str, Optional[str]] = {}
    node_state: dict[str, Optional[str]] = {}
    acpi: dict[str, dict[str, Any]] = {}
    node_meminfo: dict[str, dict[str, int]] = {}
    for p in files:
        m = re.fullmatch(re.escape(MEMORY) + r"/(memory\d+)/(\w+)", p)
        if m:
            blocks.setdefault(m.group(1), {})[m.group(2)] = text(p)
            continue
        m = re.fullmatch(re.escape(MEMORY) + r"/(\w+)", p)
        if m:
            memory_top[m.group(1)] = text(p)
            continue
        if p.startswith(PARAMS + "/"):
            params[p[len(PARAMS) + 1:]] = text(p)
            continue
        m = re.fullmatch(re.escape(NODE) + r"/(node\d+)/meminfo", p)
        if m:
            node_meminfo[m.group(1)] = _parse_meminfo(files[p]["text"])
            continue
        m = re.fullmatch(re.escape(NODE) + r"/(\w+)", p)
        if m:
            node_state[m.group(1)] = text(p)
            continue
        m = re.fullmatch(re.escape(ACPI) + r"/(PNP0C80:[0-9A-Fa-f]+)/(\w+)", p)
        if m:
            acpi.setdefault(m.group(1), {"physical_node": {}, "blocks": []})[m.group(2)] = text(p)
    for p, t in links.items():
        m = re.fullmatch(re.escape(MEMORY) + r"/(memory\d+)/(\w+)", p)
        if m:
            blocks.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        m = re.fullmatch(re.escape(ACPI) + r"/(PNP0C80:[0-9A-Fa-f]+)/(physical_node\d*)", p)
        if m:
            acpi.setdefault(m.group(1), {"physical_node": {}, "blocks": []})["physical_node"][m.group(2)] = t
    for dev in acpi.values():
        pn = dict(sorted(dev["physical_node"].items(), key=lambda kv: int(kv[0][len("physical_node"):] or 0)))
        dev["physical_node"] = pn
        dev["blocks"] = [t.rsplit("/", 1)[-1] for t in pn.values()]
    blocks = {b: dict(sorted(v.items())) for b, v in sorted(blocks.items(), key=lambda kv: _blocknum(kv[0]))}

    node_zones = _parse_zoneinfo(files["/proc/zoneinfo"]["text"]) if "/proc/zoneinfo" in files else {}
    meminfo = _parse_meminfo(files["/proc/meminfo"]["text"]) if "/proc/meminfo" in files else {}
    node_links = {
        p.rsplit("/", 1)[-1]: sorted((x for x in v if x.startswith("memory")), key=_blocknum)
        for p, v in ev.get("nodelinks", {}).items()
    }

    def lines(key: str) -> list[str]:
        v = files.get(key)
        return v["text"].splitlines() if v and v["text"] else []

    return Dump(
        step=ev["step"],
        label=ev["label"],
        uptime=ev.get("uptime"),
        blocks=blocks,
        zones=node_zones.get(0, {}),
        node_zones=node_zones,
        meminfo=meminfo,
        node_meminfo=dict(sorted(node_meminfo.items(), key=lambda kv: _blocknum(kv[0]))),
        uevents=_uevents(lines("uevents")),
        params=dict(sorted(params.items())),
        memory_top=dict(sorted(memory_top.items())),
        acpi=dict(sorted(acpi.items())),
        node_state=dict(sorted(node_state.items())),
        node_links=node_links,
        files=files,
        links=links,
        read_errors=read_errors,
        dmesg=lines("dmesg-new"),
        iomem_ram=lines("/proc/iomem(RAM)"),
        vmstat_memmap=lines("/proc/vmstat(memmap)"),
    )


def _parse_cmdline(cmdline: str) -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {}
    for tok in cmdline.split():
        k, eq, v = tok.partition("=")
        out[k] = v if eq else None
    return out


def _qemu_opts(s: str) -> dict[str, str]:
    """``type,key=val,...`` -> {"": type, key: val}; a first element without '='
    is the type/driver."""
    out: dict[str, str] = {}
    for i, part in enumerate(s.split(",")):
        k, eq, v = part.partition("=")
        if not eq and i == 0:
            out[""] = k
        else:
            out[k] = v
    return out


def _cold_dimms(argv: list[str]) -> tuple[list[tuple[str, int]], dict[str, Optional[int]]]:
    backends: dict[str, int] = {}
    dimms: list[tuple[str, int]] = []
    nodes: dict[str, Optional[int]] = {}
    for opt, val in zip(argv, argv[1:]):
        if opt == "-object":
            o = _qemu_opts(val)
            kind = o.get("qom-type") or o.get("")
            if kind and kind.startswith("memory-backend") and "id" in o and "size" in o:
                backends[o["id"]] = parse_size(o["size"])
        elif opt == "-device":
            o = _qemu_opts(val)
            if (o.get("driver") or o.get("")) in ("pc-dimm", "nvdimm") and "memdev" in o:
                did = o.get("id", "")
                dimms.append((did, backends[o["memdev"]]))
                nodes[did] = int(o["node"]) if o.get("node", "") != "" else None
    return dimms, nodes


def _cold_virtio_mem(argv: list[str]) -> list[VirtioMem]:
    backends: dict[str, int] = {}
    out: list[VirtioMem] = []
    for opt, val in zip(argv, argv[1:]):
        o = _qemu_opts(val)
        if opt == "-object" and (o.get("qom-type") or o.get("", "")).startswith("memory-backend") \
                and "id" in o and "size" in o:
            backends[o["id"]] = parse_size(o["size"])
        elif opt == "-device" and (o.get("driver") or o.get("")) == "virtio-mem-pci":
            out.append(VirtioMem(id=o.get("id", ""), size=backends[o["memdev"]],
                                 requested=parse_size(o.get("requested-size", "0")),
                                 node=int(o["node"]) if o.get("node", "") != "" else None))
    return out


def _mem_opts(argv: list[str]) -> tuple[Optional[int], Optional[int], Optional[int]]:
    for opt, val in zip(argv, argv[1:]):
        if opt == "-m":
            o = _qemu_opts(val)
            size = o.get("size") or o.get("")
            return (parse_size(size) if size else None,
                    int(o["slots"]) if "slots" in o else None,
                    parse_size(o["maxmem"]) if "maxmem" in o else None)
    return None, None, None


_LS_LINE = re.compile(
    r"(?P<mode>[-dlcbps][-rwxsStT]{9})\s+\d+\s+\S+\s+\S+\s+(?P<size>\d+)\s+\w{3}\s+\d+\s+[\d:]+\s+(?P<name>.+)$"
)


def _listing(path: str, lines: list[str]) -> Listing:
    entries: dict[str, dict[str, Any]] = {}
    for ln in lines:
        m = _LS_LINE.match(ln)
        if not m:
            continue
        name, target = m.group("name"), None
        if m.group("mode").startswith("l") and " -> " in name:
            name, target = name.split(" -> ", 1)
        entries[name] = {"mode": m.group("mode"), "size": int(m.group("size")), "target": target}
    return Listing(path=path, lines=list(lines), entries=entries)


def load_trace(name: str, kernel: str = "6.1") -> Trace:
    """Load trace ``name`` of ``kernel`` (``name`` may be a short alias such as ``"a"``).

    Raises FileNotFoundError if the traces directory or that trace is missing."""
    tdir = _resolve(name, kernel)
    tfile = _trace_file(tdir)
    assert tfile is not None
    raw = json.loads(lzma.decompress(tfile.read_bytes()) if tfile.suffix == ".xz" else tfile.read_bytes())
    meta_path = tdir / "run-meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    argv: list[str] = list(meta.get("qemu_cmd", []))

    head = raw.get("header", {})
    cmdline = head.get("cmdline", "")
    kp = _parse_cmdline(cmdline)
    cold, cold_nodes = _cold_dimms(argv)
    boot_mem, slots, maxmem = _mem_opts(argv)
    header = Header(
        scenario=head.get("scenario", ""),
        cmdline=cmdline,
        uname=head.get("uname", ""),
        memmap_on_memory=_kernel_bool(kp["memory_hotplug.memmap_on_memory"])
        if "memory_hotplug.memmap_on_memory" in kp else False,
        memhp_default_state=kp.get("memhp_default_state"),
        qemu_args=argv,
        kernel_params=kp,
        boot_mem=boot_mem,
        slots=slots,
        maxmem=maxmem,
        cold_dimm_nodes=cold_nodes,
    )

    steps: list[Step] = []
    host_requests: list[tuple[str, dict]] = []
    backends: dict[str, int] = {}
    completed = False
    events = raw.get("events", [])
    i = 0
    while i < len(events):
        ev = events[i]
        t = ev["type"]
        i += 1
        if t == "dump":
            steps.append(_build_dump(ev))
        elif t == "write":
            eno, at_open = _classify_error(ev.get("err", ""))
            if ev["rc"] != 0 and eno is None and ev.get("newline", True):
                # busybox's printf builtin reports no write error (arm64 trace: rc 1,
                # no text); an echo always does
                raise ValueError(f"failed write without error text: {ev}")
            steps.append(Write(path=ev["path"], value=ev["value"], newline=ev.get("newline", True), rc=ev["rc"],
                               errno=eno if ev["rc"] != 0 else None, at_open=at_open, err=ev.get("err", "")))
        elif t == "host_request":
            tag, qmp = ev["tag"], ev["qmp"]
            host_requests.append((tag, qmp))
            cmd = qmp.get("execute", "")
            args = qmp.get("arguments", {}) or {}
            if cmd == "object-add" and str(args.get("qom-type", "")).startswith("memory-backend"):
                backends[args["id"]] = parse_size(args["size"])
            elif cmd == "device_add" and args.get("driver") in ("pc-dimm", "nvdimm"):
                memdev = args.get("memdev")
                if memdev not in backends:
                    raise ValueError(f"device_add of {args.get('id')} with unknown memdev {memdev!r}")
                node = args.get("node")
                steps.append(HostAdd(dimm_id=args["id"], size=backends[memdev],
                                     node=int(node) if node is not None else None, memdev=memdev, tag=tag))
            elif cmd == "device_del":
                steps.append(HostDel(dimm_id=args["id"], tag=tag))
            elif cmd == "qom-set" and args.get("property") == "requested-size":
                steps.append(HostResize(device=args["path"], requested=parse_size(args["value"]), tag=tag))
            # query-*, object-del: no effect on the guest
        elif t == "waitgone":
            m = re.fullmatch(r"(\S+) (gone|still-present) tenths=(\d+)", ev["text"].strip())
            if not m:
                raise ValueError(f"bad waitgone line {ev['text']!r}")
            steps.append(WaitGone(path=m.group(1), gone=m.group(2) == "gone", tenths=int(m.group(3))))
        elif t == "waited":
            m = re.fullmatch(r"tenths=(\d+) before=(\d+) now=(\d+)", ev["text"].strip())
            if m:
                steps.append(Waited(before=int(m.group(2)), now=int(m.group(3)), tenths=int(m.group(1))))
                continue
            # f.sh waits for a condition on the block count instead ("cond=[ $n -ge 12 ]")
            m = re.fullmatch(r"tenths=(\d+) cond=(.+) now=(\d+)", ev["text"].strip())
            if not m:
                raise ValueError(f"bad waited line {ev['text']!r}")
            steps.append(Waited(before=None, now=int(m.group(3)), tenths=int(m.group(1)), cond=m.group(2)))
        elif t == "note":
            steps.append(Note(ev["text"]))
        elif t == "ls":
            lines = []
            while i < len(events) and events[i]["type"] == "output":
                lines.append(events[i]["text"])
                i += 1
            steps.append(_listing(ev["text"], lines))
        elif t == "output":
            steps.append(Output(ev["text"]))
        elif t in ("scenario", "cmdline", "uname"):
            pass  # in the header
        elif t == "scenario_done":
            completed = True
        else:
            steps.append(Marker(kind=t, text=ev.get("text", "")))

    return Trace(name=tdir.name, path=tdir, header=header, steps=steps, cold_dimms=cold,
                 cold_virtio_mem=_cold_virtio_mem(argv),
                 completed=completed, host_requests=host_requests, meta=meta, kernel=kernel)
