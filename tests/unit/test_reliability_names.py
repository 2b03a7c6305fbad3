"""Odd names at every level of the tree: ENOENT or ENAMETOOLONG, never a hit by accident,
never another exception. Names the kernel never sends (NUL, "/") are tested here, at the
operations layer, because no system call can carry them to the daemon; tests/integration/
test_reliability_hostile.py sends the rest through a real mount."""
from __future__ import annotations

import errno

import pytest

from memfs.fuse import SysfsOperations
from memfs.machine.hotplug import Machine
from memfs.sysfs.kernfs import DirNode
from memfs.sysfs.tree import build_tree

ODD = [
    "memory٣٢",      # Arabic-Indic digits: str.isdigit() is true, sysfs has no such entry
    "memory²",       # superscript two: isdigit() true, int() fails
    "memory𝟑𝟐",      # mathematical digits
    "memory032", "memory-1", "memory+32", "memory 32", "memory32 ", "memory0x20", "memory_",
    "node٠", "node²", "node00", "PNP0C80:٠٠",
    "memory\udcff", "\udcff\udcfe",  # bytes that are not UTF-8, as the daemon's codec delivers them
    "é", "..", ".", "...", " ", "\t", "\n", "*", "?", "memory3\u0332",
]


def dirs(tree) -> list[str]:
    out = []

    def walk(node, path):
        if isinstance(node, DirNode):
            out.append(path or "/")
            if len(out) < 400:
                for name, child in node.entries():
                    walk(child, f"{path}/{name}")
    walk(tree.root, "")
    return out


@pytest.fixture(scope="module")
def tree():
    return build_tree(Machine.from_config())


def test_odd_names_are_not_found_anywhere(tree):
    for d in dirs(tree):
        for name in ODD:
            path = d.rstrip("/") + "/" + name
            if name in (".", ".."):
                continue  # the kernel resolves these itself; FUSE never sends them
            with pytest.raises(OSError) as ei:
                tree.resolve(path)
            assert ei.value.errno == errno.ENOENT, path


@pytest.mark.parametrize("n, code", [(255, errno.ENOENT), (256, errno.ENAMETOOLONG), (1024, errno.ENAMETOOLONG)])
def test_long_names(tree, n, code):
    for d in ("", "/sys/devices/system/memory", "/sys/devices/system/node/node0"):
        for name in ("a" * n, "memory" + "9" * (n - 6), "é" * (n // 2) + "a" * (n % 2)):
            with pytest.raises(OSError) as ei:
                tree.resolve(f"{d}/{name}")
            assert ei.value.errno == code, (d, name[:10], len(name.encode()))


@pytest.mark.parametrize("op", ["getattr", "open", "readlink", "readdir", "truncate", "getxattr", "listxattr",
                                "utimens"])
def test_names_no_syscall_can_send_still_fail_cleanly(op):
    ops = SysfsOperations(build_tree(Machine.from_config()))
    args = {"open": (0,), "readdir": (0,), "truncate": (0,), "getxattr": ("user.x",), "utimens": ()}.get(op, ())
    for path in ("/sys\0/devices", "/sys/devices/system/memory/memory32\0", "/\0", "/sys/devices/system/memory/memory32/state\0x"):
        with pytest.raises(OSError) as ei:
            ops(op, path, *args)
        assert ei.value.errno in (errno.ENOENT, errno.ENOTDIR), (op, path)
