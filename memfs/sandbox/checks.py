"""The sandbox's safety checks: root, network namespaces, and the memfs overlays."""
from __future__ import annotations

import os
from typing import Iterable, Sequence, TypedDict

from ..mountinfo import FSTYPE, FUSE_SOURCE, MountEntry, read_mountinfo, top_mount

#: init_net's inode on kernels with fixed init namespace inodes (include/linux/proc_ns.h,
#: PROC_NET_INIT_INO)
INIT_NET_INO = 0xEFFFFFF9


class SandboxError(Exception):
    """The sandbox cannot be made or used safely; the message says why (``errno``: the
    failed system call's, when that was the cause)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class Expectations(TypedDict):
    """What a process entering the sandbox must find there (see :func:`check_in_sandbox`)."""
    dev: str                   # the FUSE mount's device, "major:minor"
    netns: int                 # the sandbox's network namespace (inode)
    initial_net: list[int]     # inodes that mean "the host's network namespace"
    overlays: list[list[str]]  # [root on the memfs mount, target] of each overlay


def require_root(what: str = "the memfs sandbox") -> None:
    if os.geteuid() != 0:
        raise SandboxError(f"{what} needs root (it creates user, mount, network and pid namespaces "
                           f"and bind-mounts over /sys and /proc inside them); run it as root, "
                           f"e.g. with sudo")


def ns_ino(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def initial_netns_inodes(extra: Iterable[int] = ()) -> set[int]:
    """Inodes that identify the initial network namespace (or the host's)."""
    found = {INIT_NET_INO, *extra}
    pid1 = ns_ino("/proc/1/ns/net")
    if pid1 is not None:
        found.add(pid1)
    return found


def check_netns(netns: int, initial: Iterable[int], expected: int | None = None, where: str = "") -> None:
    """Refuse if ``netns`` is an initial network namespace (or not the one expected)."""
    if netns in {INIT_NET_INO, *initial}:
        raise SandboxError(f"refusing: {where or 'the sandbox'} is in the initial network namespace "
                           f"(net:[{netns}]); uevents must never be sent there")
    if expected is not None and netns != expected:
        raise SandboxError(f"refusing: {where or 'this process'} is in net:[{netns}], not the "
                           f"sandbox's network namespace net:[{expected}]")


def fuse_identity(mnt: str) -> MountEntry:
    """The memfs mount at ``mnt`` in this mount namespace, or SandboxError."""
    real = os.path.realpath(mnt)
    top = top_mount(read_mountinfo(), real)
    if top is None:
        raise SandboxError(f"refusing: {real} is not a mount point (a plain directory?); the sandbox "
                           f"binds only a live memfs mount over /sys and /proc")
    if top.fstype != FSTYPE or top.source != FUSE_SOURCE:
        raise SandboxError(f"refusing: {real} is a {top.fstype} mount (source {top.source!r}), "
                           f"not a memfs mount ({FSTYPE}, source {FUSE_SOURCE!r})")
    return top


def check_overlays(entries: list[MountEntry], dev: str, overlays: Sequence[Sequence[str]]) -> None:
    """Each ``(root, target)`` must show this memfs mount (fstype, source, device, root)."""
    for root, target in overlays:
        top = top_mount(entries, target)
        if top is None:
            raise SandboxError(f"refusing: {target} is not covered by the memfs overlay "
                               f"(the real file would show through)")
        bad = []
        if top.fstype != FSTYPE:
            bad.append(f"fstype {top.fstype}")
        if top.source != FUSE_SOURCE:
            bad.append(f"source {top.source!r}")
        if top.dev != dev:
            bad.append(f"device {top.dev} instead of {dev}")
        if top.root != "/" + root:
            bad.append(f"root {top.root} instead of /{root}")
        if bad:
            raise SandboxError(f"refusing: the mount at {target} is not this memfs mount "
                               f"({', '.join(bad)})")


def check_in_sandbox(expect: Expectations) -> None:
    """The checks made inside the sandbox (by the entering trampoline) before anything runs."""
    check_netns(os.stat("/proc/self/ns/net").st_ino, expect["initial_net"], expected=expect["netns"],
                where="this process")
    check_overlays(read_mountinfo("/proc/self/mountinfo"), expect["dev"], expect["overlays"])
