"""Unmodified util-linux tools inside a memfs sandbox (memfs_machine fixture, daemon-held
sandbox): chmem, lsmem without --sysroot, a failing offline, memfs exec's exit codes, and
what the sandbox hides (disks) or makes read-only (the real /sys and /proc).

Default machine: blocks 0-7 online (boot RAM), 32 (dimm1, 128M), 33 (dimm2, 128M) and
34-41 (dimm3, 1G) offline at boot (memhp_default_state=offline).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from memfs.pytest_plugin import fuse_unavailable

pytestmark = [
    pytest.mark.skipif(fuse_unavailable() is not None, reason=fuse_unavailable() or ""),
    pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root"),
    pytest.mark.skipif(shutil.which("chmem") is None or shutil.which("lsmem") is None,
                       reason="util-linux chmem/lsmem missing"),
]

MEM = "/sys/devices/system/memory"


def states(m, blocks):
    return {b: m.read(f"{MEM}/memory{b}/state").strip() for b in blocks}


def test_chmem_enable_by_size(memfs_machine):
    m = memfs_machine
    r = m.run("chmem", "-e", "256M")
    assert r.returncode == 0, r.stderr
    # chmem takes the lowest offline blocks first
    assert states(m, [32, 33, 34]) == {32: "online", 33: "online", 34: "offline"}
    assert [e["action"] for e in m.events(since=18)] == ["online", "online"]


def test_chmem_enable_disable_blocks_and_movable_zone(memfs_machine):
    m = memfs_machine
    r = m.run("chmem", "-e", "-b", "32-33")
    assert r.returncode == 0, r.stderr
    assert states(m, [32, 33]) == {32: "online", 33: "online"}
    r = m.run("chmem", "-d", "-b", "32")
    assert r.returncode == 0, r.stderr
    assert states(m, [32, 33]) == {32: "offline", 33: "online"}
    r = m.run("chmem", "-e", "-z", "Movable", "-b", "34")
    assert r.returncode == 0, r.stderr
    assert m.read(f"{MEM}/memory34/state") == "online\n"
    assert m.read(f"{MEM}/memory34/valid_zones") == "Movable\n"
    # the same answer from inside the sandbox, at the real path
    r = m.run("cat", f"{MEM}/memory34/valid_zones")
    assert r.stdout == "Movable\n"


def test_failing_offline_is_reported_by_chmem(memfs_machine):
    m = memfs_machine
    assert m.run("chmem", "-e", "-z", "Normal", "-b", "33").returncode == 0
    a = m.alloc("4M", kind="unmovable", block=33)   # pins memory33
    r = m.run("chmem", "-d", "-b", "33")
    assert r.returncode != 0
    assert "Memory Block 33" in r.stderr and "disable failed: Device or resource busy" in r.stderr
    assert m.read(f"{MEM}/memory33/state") == "online\n"
    m.free(a["id"])
    r = m.run("chmem", "-d", "-b", "33")
    assert r.returncode == 0, r.stderr
    assert m.read(f"{MEM}/memory33/state") == "offline\n"


def test_lsmem_without_sysroot(memfs_machine):
    m = memfs_machine
    r = m.run("lsmem", "-o", "RANGE,STATE,BLOCK", "--summary=never")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:] if line.strip()]
    assert rows == [["0x0000000000000000-0x000000003fffffff", "online", "0-7"],
                    ["0x0000000100000000-0x000000014fffffff", "offline", "32-41"]]
    m.plug("256M")
    r = m.run("lsmem", "-o", "RANGE,STATE,BLOCK", "--summary=never")
    assert r.stdout.split()[-3:] == ["0x0000000100000000-0x000000015fffffff", "offline", "32-43"]
    # /proc/meminfo is memfs's too: the host has far more than 1 GiB
    total_kb = int(m.run("awk", "/^MemTotal:/ {print $2}", "/proc/meminfo").stdout)
    assert total_kb == int(m.read("/proc/meminfo").split("MemTotal:")[1].split()[0])
    assert total_kb < 1024 * 1024


def test_memfs_exec_exit_status_and_output(memfs_machine):
    mnt = str(memfs_machine.path)
    exe = [sys.executable, "-m", "memfs", "exec", mnt, "--"]
    r = subprocess.run(exe + ["sh", "-c", f"cat {MEM}/memory32/state; echo oops >&2; exit 3"],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (3, "offline\n", "oops\n")
    r = subprocess.run(exe + ["/nonexistent/cmd"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 127 and "cannot run /nonexistent/cmd" in r.stderr
    r = subprocess.run(exe + ["chmem", "-e", "-b", "41"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert memfs_machine.read(f"{MEM}/memory41/state") == "online\n"


def test_sandbox_hides_disks_and_protects_real_sysfs(memfs_machine):
    m = memfs_machine
    r = m.run("sh", "-c", "ls /dev; echo 1 > /sys/kernel/uevent_helper")
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    assert sorted(r.stdout.split()) == sorted(["fd", "full", "null", "ptmx", "pts", "random", "shm",
                                               "stderr", "stdin", "stdout", "tty", "urandom", "zero"])
    # pid 1 is the holder: nothing of the host is visible
    r = m.run("sh", "-c", "ls /proc | grep -c '^[0-9]'")
    assert int(r.stdout) <= 4
    # a memfs attribute stays writable
    assert m.run("sh", "-c", f"echo online > {MEM}/memory32/state").returncode == 0
    assert m.read(f"{MEM}/memory32/state") == "online\n"


def test_mount_below_run_and_memfs_commands_inside_the_sandbox():
    """/run is a private tmpfs in the sandbox: a mount point below /run still works, and the
    memfs run directory is bound in, so `memfs status MNT` works from inside."""
    import tempfile
    from memfs.pytest_plugin import _cleanup, memfs_cli
    os.makedirs("/run/memfs", exist_ok=True)
    base = tempfile.mkdtemp(prefix="sbx-test-", dir="/run/memfs")
    mnt = os.path.join(base, "mnt")
    try:
        r = memfs_cli("mount", mnt, "--sandbox")
        assert r.returncode == 0, r.stderr
        r = memfs_cli("exec", mnt, "--", sys.executable, "-m", "memfs", "status", mnt)
        assert r.returncode == 0, r.stderr
        assert f"memfs at {mnt}" in r.stdout
        r = memfs_cli("exec", mnt, "--", "lsmem", "-o", "BLOCK", "-n", "--summary=never")
        assert r.stdout.split() == ["0-7", "32-41"]
    finally:
        _cleanup(__import__("pathlib").Path(mnt), None)
        shutil.rmtree(base, ignore_errors=True)


def test_status_shows_the_sandbox_and_exec_says_why_there_is_none(memfs_mount):
    """memfs status (text and --json) tells whether a sandbox runs; without one, memfs exec
    and memfs udevd say the daemon's reason and exit 125."""
    on = memfs_mount(extra=["--sandbox"])
    sb = on.status()["sandbox"]
    assert sb["mode"] == "on" and sb["running"] is True and sb["error"] is None
    assert os.path.exists(f"/proc/{sb['holder']}")
    r = on.cli("status")
    assert f"sandbox: running (holder pid {sb['holder']}; memfs exec/udevd work)" in r.stdout

    off = memfs_mount(extra=["--no-sandbox"])
    assert off.status()["sandbox"] == {"mode": "off", "running": False, "holder": None,
                                       "error": "it was mounted with --no-sandbox"}
    r = off.cli("status")
    assert "sandbox: none (it was mounted with --no-sandbox)" in r.stdout
    for cmd in (("exec", "--", "true"), ("udevd", "--stop")):
        r = off.cli(*cmd)
        assert (r.returncode, r.stderr) == (
            125, f"memfs: no sandbox for {off.path}: it was mounted with --no-sandbox\n")
