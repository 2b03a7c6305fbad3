"""Replay reference traces end to end through `memfs mount`, with the shell: both 6.1
traces, one trace of each newer kernel (6.12, 7.2; `--kernel` gets the recorded
release string, as a user would type `uname -r`), and arm64 6.1 (below).

The daemon is started with the `memfs` command and the trace's kernel command line
(`--set boot.memmap_on_memory=...`). Every write of the trace is `echo VALUE > MNT/PATH`
(or `printf`) run by bash, and the shell's error message must name the kernel's errno.
Host steps are `memfs plug` / `memfs unplug` (QEMU device_add / device_del). At every
dump, one bash script reads each file the guest read (`cat`, like the guest's lib.sh),
and the results are compared with the dump: block files and links, zone counters from
MNT/proc/zoneinfo, MemTotal from MNT/proc/meminfo.

Where the kernel refused an offline with EBUSY because it had put its own allocations
into the block, the test first pins one with `memfs alloc --unmovable 4K --block N`.
"""
from __future__ import annotations

import errno
import os
import subprocess

import pytest

import sys

from tests.support.fuse import fuse_unavailable
from tests.conformance.traces import (
    TRACE_A, TRACE_B, Dump, HostAdd, HostDel, Write, _parse_meminfo, _parse_zoneinfo,
    errno_from_strerror, load_trace,
)

pytestmark = pytest.mark.skipif(bool(fuse_unavailable()), reason=fuse_unavailable() or "")


def sh(script: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["timeout", "-s", "KILL", str(timeout), "bash", "-c", script, "bash", *args],
                          capture_output=True, text=True, timeout=timeout + 5)


def shell_write(mnt: str, w: Write) -> int | None:
    """errno of `echo value > file` as bash reports it, None on success."""
    cmd = 'echo "$1" > "$2"' if w.newline else 'printf "%s" "$1" > "$2"'
    r = sh(cmd, w.value, mnt + w.path)
    if r.returncode == 0:
        return None
    return errno_from_strerror(r.stderr.strip().rsplit(": ", 1)[-1])


READ_ALL = r'''
for f in "$@"; do
  v=$(cat "$f" 2>/dev/null); rc=$?
  printf '@@F %s %s\n%s\n' "$f" "$rc" "$v"
done
'''


def shell_read(mnt: str, paths: list[str]) -> dict[str, str | None]:
    r = sh(READ_ALL, *(mnt + p for p in paths))
    out: dict[str, str | None] = {}
    cur = None
    for line in r.stdout.split("\n"):
        if line.startswith("@@F "):
            _, path, rc = line.split(" ")
            cur = path[len(mnt):]
            out[cur] = "" if rc == "0" else None
        elif cur is not None and out[cur] is not None:
            out[cur] = line if not out[cur] else out[cur] + "\n" + line
    return {k: (v.rstrip("\n") if v is not None else None) for k, v in out.items()}


def compare(mnt: str, dump: Dump) -> list[str]:
    diffs = []
    paths = [f"/sys/devices/system/memory/{b}/{a}" for b in dump.blocks
             for a in dump.block_files(b)]
    got = shell_read(mnt, paths + ["/proc/zoneinfo", "/proc/meminfo"])
    for p in paths:
        b, a = p.split("/")[-2:]
        if got.get(p) != dump.blocks[b][a]:
            diffs.append(f"{p}: kernel {dump.blocks[b][a]!r}, mount {got.get(p)!r}")
    listed = sorted(n for n in os.listdir(mnt + "/sys/devices/system/memory") if n.startswith("memory"))
    if listed != sorted(dump.blocks):
        diffs.append(f"blocks listed: kernel {sorted(dump.blocks)}, mount {listed}")
    for b in dump.blocks:
        for name, target in dump.block_links(b).items():
            mine = os.readlink(f"{mnt}/sys/devices/system/memory/{b}/{name}")
            if mine != target:
                diffs.append(f"{b}/{name}: kernel -> {target}, mount -> {mine}")
    zones = _parse_zoneinfo(got["/proc/zoneinfo"] or "").get(0, {})
    for name in ("DMA", "DMA32", "Normal", "Movable"):
        for key in ("spanned", "present", "managed", "start_pfn"):
            k, m = dump.zones.get(name, {}).get(key), zones.get(name, {}).get(key)
            if k != m:
                diffs.append(f"zone {name} {key}: kernel {k}, mount {m}")
    mt = _parse_meminfo(got["/proc/meminfo"] or "").get("MemTotal")
    if mt != dump.mem_total:
        diffs.append(f"MemTotal: kernel {dump.mem_total}, mount {mt}")
    return diffs


def memfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memfs", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("kernel, name", [("6.1", TRACE_A), ("6.1", TRACE_B), ("6.12", TRACE_A), ("7.2", TRACE_A)])
def test_trace_through_memfs_mount_with_the_shell(kernel, name, tmp_path):
    trace = load_trace(name, kernel)
    h = trace.header
    mnt = os.fspath(tmp_path / "mnt")
    r = memfs("mount", mnt, "--no-sandbox", "--kernel", h.release or "6.1",
              "--set", f"boot.memmap_on_memory={str(h.memmap_on_memory).lower()}",
              "--set", f"boot.memhp_default_state={h.memhp_default_state or 'offline'}")
    assert r.returncode == 0, r.stderr
    # a release string: the covering profile is named
    assert f"memfs: note: kernel {h.release}: profile {kernel} (exact release line)" in r.stderr
    problems: list[str] = []
    pinned: set[str] = set()
    try:
        for actions, dump in trace.segments():
            for step in actions:
                if isinstance(step, Write):
                    if step.errno == errno.EBUSY and step.value == "offline" and step.block \
                            and step.block not in pinned:
                        a = memfs("alloc", mnt, "--unmovable", "4K", "--block", step.block[6:])
                        assert a.returncode == 0, a.stderr
                        pinned.add(step.block)
                    got = shell_write(mnt, step)
                    if got != step.errno:
                        problems.append(f"{step.value!r} > {step.path}: kernel {step.errname}, "
                                        f"mount {errno.errorcode.get(got) if got else None}")
                elif isinstance(step, HostAdd):
                    args = ["plug", mnt, "--size", str(step.size), "--id", step.dimm_id]
                    if step.node is not None:
                        args += ["--node", str(step.node)]
                    p = memfs(*args)
                    assert p.returncode == 0, p.stderr
                elif isinstance(step, HostDel):
                    u = memfs("unplug", mnt, step.dimm_id)
                    assert u.returncode == 0, u.stderr
            problems += [f"dump {dump.step} ({dump.label}): {d}" for d in compare(mnt, dump)]
    finally:
        memfs("umount", mnt)
    assert not problems, "\n".join(problems)
    assert pinned == {"memory32"}


ARM64_MACHINE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "conformance", "machines", "arm64-virt-6.1.toml")


@pytest.mark.parametrize("name", [TRACE_A, TRACE_B])
def test_arm64_trace_through_memfs_mount_with_the_shell(name, tmp_path):
    """The arm64 guest (tests/conformance/machines/arm64-virt-6.1.toml) with the trace's three
    cold-plugged DIMMs: no pinning, every EBUSY comes from the description (CMA, kernel
    pages). busybox's printf failed one write without a message; bash's names EINVAL."""
    trace = load_trace(name, kernel="arm64-6.1")
    h = trace.header
    mnt = os.fspath(tmp_path / "mnt")
    dimms = ", ".join(f'{{id = "{i}", size = {s}}}' for i, s in trace.cold_dimms)
    r = memfs("mount", mnt, "--no-sandbox", "--config", ARM64_MACHINE,
              "--set", f"boot.memmap_on_memory={str(h.memmap_on_memory).lower()}",
              "--set", f"dimm=[{dimms}]")
    assert r.returncode == 0, r.stderr
    problems: list[str] = []
    try:
        for actions, dump in trace.segments():
            for step in actions:
                if isinstance(step, Write):
                    got = shell_write(mnt, step)
                    if (got is None) if (step.rc and step.errno is None) else (got != step.errno):
                        problems.append(f"{step.value!r} > {step.path}: kernel {step.errname or step.rc}, "
                                        f"mount {errno.errorcode.get(got) if got else None}")
                elif isinstance(step, HostAdd):
                    p = memfs("plug", mnt, "--size", str(step.size), "--id", step.dimm_id)
                    assert p.returncode == 0 and "no ACPI memory hotplug" in p.stderr, p.stderr
                elif isinstance(step, HostDel):
                    u = memfs("unplug", mnt, step.dimm_id)
                    assert u.returncode == 0, u.stderr
            problems += [f"dump {dump.step} ({dump.label}): {d}" for d in compare(mnt, dump)]
    finally:
        memfs("umount", mnt)
    assert not problems, "\n".join(problems)
