"""Sysroot dumps for `memfs describe` tests: the files describe and lsmem read, copied
read-only from a directory (the live /, a memfs mount) or from a memfs Tree without FUSE.

A dump holds what util-linux's lsmem test dumps hold (sys/devices/system/memory) plus the
optional parts describe reads: node masks and nodeN/meminfo, memory_hotplug parameters,
the firmware memmap, ACPI memory devices, proc/{zoneinfo,meminfo,iomem,cmdline} and
proc/sys/kernel/{osrelease,arch}.
"""
from __future__ import annotations

import json
import lzma
import os
import re
import stat
from pathlib import Path
from typing import Callable, Iterator

from memfs.sysfs.kernfs import Attr, DirNode, Link, Tree

_COLUMNS = "RANGE,SIZE,STATE,REMOVABLE,BLOCK,NODE,ZONES"
LSMEM_OPTION_SETS: tuple[tuple[str, ...], ...] = (
    # util-linux tests/ts/lsmem/lsmem: the option sets its test runs on each dump, in its order
    ("--split=STATE,REMOVABLE",),
    ("--output", "RANGE,SIZE", "--split", "none"),
    ("--output", "RANGE,SIZE,STATE", "--split", "STATE"),
    ("--all", "--output", _COLUMNS),
    ("--raw", "--output", _COLUMNS, "--split", _COLUMNS),
    ("--json", "--output", _COLUMNS, "--split", _COLUMNS),
    ("-o", "+ZONES"),
    ("--output-all",),
    (),
)

_MEM = "sys/devices/system/memory"
_NODE = "sys/devices/system/node"
_TOP_FILES = ("proc/zoneinfo", "proc/meminfo", "proc/iomem", "proc/cmdline", "proc/sys/kernel/osrelease",
              "proc/sys/kernel/arch", f"{_MEM}/block_size_bytes", f"{_MEM}/auto_online_blocks",
              f"{_NODE}/possible", f"{_NODE}/online", f"{_NODE}/has_cpu", f"{_NODE}/has_memory",
              f"{_NODE}/has_normal_memory")
_DIRS = (f"{_MEM}", f"{_NODE}", "sys/module/memory_hotplug/parameters", "sys/firmware/memmap",
         "sys/bus/acpi/devices")


def _wanted(rel: str) -> bool:
    """The entries of a dump (relative paths below the sysroot)."""
    parts = rel.split("/")
    if rel.startswith(_MEM + "/"):
        sub = parts[4:]
        if sub[0] == "probe":
            return True  # write-only: kept as an empty file, its presence is what matters
        if not re.fullmatch(r"memory\d+", sub[0]):
            return False
        return len(sub) == 1 or (len(sub) == 2 and sub[1] not in ("power", "uevent", "subsystem"))
    if rel.startswith(_NODE + "/"):
        sub = parts[4:]
        if not re.fullmatch(r"node\d+", sub[0]):
            return False
        return len(sub) == 1 or (len(sub) == 2 and (sub[1] in ("meminfo", "cpulist", "distance")
                                                    or re.fullmatch(r"memory\d+", sub[1]) is not None))
    if rel.startswith("sys/bus/acpi/devices/"):
        return len(parts) == 5 and parts[4].startswith("PNP0C80:")
    if rel.startswith("sys/firmware/memmap/"):
        return len(parts) <= 5
    return rel.startswith("sys/module/memory_hotplug/parameters/") and len(parts) == 5


class _Source:
    """What the walker needs: kind of an entry ('d', 'f', 'l', None), list, read, readlink."""
    kind: Callable[[str], str | None]
    names: Callable[[str], list[str]]
    read: Callable[[str], bytes | None]
    link: Callable[[str], str]


def _fs_source(root: Path) -> _Source:
    s = _Source()

    def kind(rel: str) -> str | None:
        try:
            st = os.lstat(root / rel)
        except OSError:
            return None
        return "l" if stat.S_ISLNK(st.st_mode) else "d" if stat.S_ISDIR(st.st_mode) else "f"

    def read(rel: str) -> bytes | None:
        try:
            fd = os.open(root / rel, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            out = b""
            while chunk := os.read(fd, 65536):
                out += chunk
            return out
        except OSError:
            return None
        finally:
            os.close(fd)

    s.kind, s.names, s.read, s.link = kind, lambda rel: sorted(os.listdir(root / rel)), read, \
        lambda rel: os.readlink(root / rel)
    return s


def _tree_source(tree: Tree) -> _Source:
    s = _Source()

    def node(rel: str):
        try:
            return tree.resolve("/" + rel)
        except OSError:
            return None

    def kind(rel: str) -> str | None:
        n = node(rel)
        return None if n is None else "l" if isinstance(n, Link) else "d" if isinstance(n, DirNode) else "f"

    def read(rel: str) -> bytes | None:
        n = node(rel)
        if not isinstance(n, Attr) or not n.readable:
            return None
        return n.show().encode()

    s.kind, s.read = kind, read
    s.names = lambda rel: sorted(node(rel).names())  # type: ignore[union-attr]
    s.link = lambda rel: node(rel).target  # type: ignore[union-attr]
    return s


def _walk(src: _Source) -> Iterator[tuple[str, str]]:
    for rel in _TOP_FILES:
        if src.kind(rel) == "f":
            yield rel, "f"
    for top in _DIRS:
        if src.kind(top) != "d":
            continue
        stack = [top]
        while stack:
            d = stack.pop()
            for name in src.names(d):
                rel = f"{d}/{name}"
                k = src.kind(rel)
                if k is None or not _wanted(rel):
                    continue
                yield rel, k
                if k == "d":
                    stack.append(rel)


def _write(src: _Source, dst: Path) -> int:
    n = 0
    for rel, k in _walk(src):
        p = dst / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if k == "d":
            p.mkdir(exist_ok=True)
        elif k == "l":
            os.symlink(src.link(rel), p)
        else:
            data = src.read(rel)
            p.write_bytes(data if data is not None else b"")
            n += 1
    return n


def copy_sysroot(root: str | os.PathLike[str], dst: str | os.PathLike[str]) -> int:
    """Copy a live sysroot's (/, a memfs mount) dump files into dst; returns files copied."""
    return _write(_fs_source(Path(root)), Path(dst))


def dump_tree(tree: Tree, dst: str | os.PathLike[str], release: str | None = None, arch: str | None = None,
              iomem: str | None = None) -> int:
    """A memfs tree (no FUSE) as a dump; release/arch/iomem are what the kernel would add."""
    n = _write(_tree_source(tree), Path(dst))
    for rel, text in (("proc/sys/kernel/osrelease", release), ("proc/sys/kernel/arch", arch),
                      ("proc/iomem", iomem)):
        if text is not None:
            p = Path(dst) / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
    return n


def attribute_files(root: str | os.PathLike[str]) -> dict[str, str]:
    """Every memory block attribute and link of a sysroot or dump, and each node's memory
    links, cpulist, distance and MemTotal/MemFree/MemUsed: relative path -> text or link target."""
    out: dict[str, str] = {}
    src = _fs_source(Path(root))
    for rel, k in _walk(src):
        if not rel.startswith(_MEM + "/") and not rel.startswith(_NODE + "/node"):
            continue
        if k == "f":
            data = src.read(rel)
            text = data.decode() if data is not None else "<unreadable>"
            if rel.endswith("/meminfo"):  # the rest is the running system's, not the memory layout's
                text = "".join(ln + "\n" for ln in text.splitlines()
                               if re.match(r"Node \d+ Mem(Total|Free|Used):", ln))
            out[rel] = text
        elif k == "l":
            out[rel] = "-> " + src.link(rel)
    return out



CONFORMANCE = Path(__file__).resolve().parents[1] / "conformance" / "data"


def trace_dumps(kernel: str, scenario: str) -> tuple[dict[str, str], list[dict]]:
    """A recorded trace of a real kernel (tests/conformance/data): its header and dump events."""
    raw = json.loads(lzma.decompress((CONFORMANCE / kernel / scenario / "trace.json.xz").read_bytes()))
    return raw["header"], [e for e in raw["events"] if e.get("type") == "dump"]


def dump_from_trace(header: dict[str, str], dump: dict, dst: str | os.PathLike[str]) -> int:
    """A dump directory from one dump of a recorded trace: every file the guest read
    (``/proc/iomem(RAM)`` is the RAM lines of /proc/iomem), its links and node links; the
    release, arch and command line from the trace's header (uname -a, /proc/cmdline)."""
    dst = Path(dst)

    def put(rel: str, text: str) -> None:
        p = dst / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\n" if text else "")

    n = 0
    for path, f in dump["files"].items():
        if path == "/proc/iomem(RAM)":
            path = "/proc/iomem"
        if f.get("rc") != 0 or not path.startswith(("/sys/", "/proc/")) or "(" in path:
            continue
        put(path, f["text"])
        n += 1
    for path, target in dump["links"].items():
        p = dst / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, p)
    for d, names in dump.get("nodelinks", {}).items():
        for name in names:
            p = dst / d.lstrip("/") / name
            p.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f"../../memory/{name}", p)
    uname = header["uname"].split()  # Linux HOST RELEASE #1 ... ARCH GNU/Linux
    put("proc/sys/kernel/osrelease", uname[2])
    put("proc/sys/kernel/arch", uname[-2])
    put("proc/cmdline", header.get("cmdline", ""))
    return n
