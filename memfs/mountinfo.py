"""/proc/self/mountinfo: the one parser memfs uses (daemon, CLI, sandbox, tests).

Format: Documentation/filesystems/proc.rst, "3.5 /proc/<pid>/mountinfo"; the kernel
escapes space, tab, newline and backslash in paths as ``\\ooo`` octal
(fs/proc_namespace.c: show_mountinfo -> seq_path_root/mangle with " \\t\\n\\\\").
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

#: a memfs mount in mountinfo: memfs/fuse.py mounts with fsname and subtype "memfs";
#: the kernel shows the type as "fuse." + subtype (fs/fuse/inode.c, fuse_fs_type)
FSTYPE = "fuse.memfs"
FUSE_SOURCE = "memfs"

_OCTAL = re.compile(r"\\([0-7]{3})")


def unescape(s: str) -> str:
    """Undo the kernel's ``\\ooo`` escapes of a mountinfo field."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), s)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    dev: str          # "major:minor"
    root: str
    target: str
    mount_opts: str
    fstype: str
    source: str


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Every mount of ``path`` (a mountinfo file), in the kernel's order (bottom to top)."""
    entries = []
    with open(path) as f:
        for line in f:
            pre, _, post = line.rstrip("\n").partition(" - ")
            a, b = pre.split(), post.split()
            if len(a) < 6 or len(b) < 2:
                continue
            entries.append(MountEntry(int(a[0]), int(a[1]), a[2], unescape(a[3]), unescape(a[4]),
                                      a[5], b[0], unescape(b[1])))
    return entries


def top_mount(entries: list[MountEntry], target: str) -> MountEntry | None:
    """The mount that is visible at ``target`` (the last one mounted there)."""
    hits = [e for e in entries if e.target == target]
    return hits[-1] if hits else None


def mounts_at(path: str | os.PathLike[str]) -> list[str]:
    """fstypes of everything mounted at ``path`` (bottom to top), in this mount namespace."""
    target = os.path.realpath(path)
    return [e.fstype for e in read_mountinfo() if e.target == target]
