"""Each safety check of memfs.sandbox refuses when its condition is broken, and the
sandbox leaves nothing behind. Every mount here is either a test-local FUSE mount
(tests/support/fuse.py) or inside a private mount namespace of a child process."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from memfs.cli import main as memfs_main
from memfs.daemon import probe
from memfs.machine.hotplug import Machine
from memfs.sandbox import MachineSandbox, Sandbox, SandboxError, check_netns, initial_netns_inodes
from memfs.sandbox.core import package_parent
from memfs.sandbox.enter import ENTRY as ENTER_ENTRY
from memfs.sandbox.libc import SIOCGSKNS
from memfs.sysfs.tree import build_tree
from memfs.testing.mount import memfs_cli
from tests.support.fuse import fuse_unavailable, mounted
from tests.support.waiting import wait_for

pytestmark = [
    pytest.mark.skipif(fuse_unavailable() is not None, reason=fuse_unavailable() or ""),
    pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root"),
]

MEM = "/sys/devices/system/memory"


def holders_of(mnt: str) -> list[int]:
    """Live sandbox holder processes whose spec names ``mnt``."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                args = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(b"memfs.sandbox.holder" in a for a in args) and any(os.fsencode(mnt) + b'"' in a for a in args):
                out.append(int(p))
    return out


def sandbox_processes(sb: Sandbox, comm: str) -> list[int]:
    """Host pids of the processes named ``comm`` in the sandbox's pid namespace."""
    pidns = os.stat(f"/proc/{sb.holder}/ns/pid").st_ino
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if (Path(f"/proc/{p}/comm").read_text().strip() == comm
                        and os.stat(f"/proc/{p}/ns/pid").st_ino == pidns):
                    out.append(int(p))
            except OSError:
                continue
    return out


@pytest.fixture
def local_mount(tmp_path):
    machine = Machine.from_config()
    with mounted(build_tree(machine), tmp_path, mode="thread") as mnt:
        yield machine, os.fspath(mnt.path)


@pytest.fixture
def sandbox(local_mount):
    _, mnt = local_mount
    sb = Sandbox.start(mnt)
    try:
        yield sb
    finally:
        sb.stop()
    assert holders_of(mnt) == []


# ---------------------------------------------------------------------- the mount itself

def test_plain_directory_is_refused(tmp_path):
    plain = tmp_path / "plain"
    for d in ("sys/devices/system/memory", "sys/devices/system/node", "sys/bus/memory", "proc"):
        (plain / d).mkdir(parents=True)
    for f in ("meminfo", "zoneinfo", "vmstat"):
        (plain / "proc" / f).write_text("")
    with pytest.raises(SandboxError, match="is not a mount point .*a plain directory"):
        Sandbox.start(plain)
    assert holders_of(str(plain)) == []


def test_another_filesystem_is_refused(tmp_path):
    """A tmpfs at MNT (mounted inside a private mount namespace of a child) is refused."""
    d = tmp_path / "tmpfs"
    d.mkdir()
    code = ("import subprocess, sys; from memfs.sandbox import Sandbox, SandboxError\n"
            f"subprocess.run(['mount', '-t', 'tmpfs', 'none', {str(d)!r}], check=True)\n"
            f"try:\n    Sandbox.start({str(d)!r})\nexcept SandboxError as e:\n    print(e); sys.exit(3)\n")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=package_parent()))
    assert r.returncode == 3, r.stderr
    assert "is a tmpfs mount" in r.stdout and "not a memfs mount" in r.stdout


# ---------------------------------------------------------------------- network namespace

def test_initial_network_namespace_is_refused(local_mount):
    """A holder left in the host's network namespace refuses before binding anything."""
    _, mnt = local_mount
    with pytest.raises(SandboxError, match="initial network namespace"):
        Sandbox.start(mnt, _test_keep=("net",))
    assert holders_of(mnt) == []


def test_a_sandbox_taken_for_the_initial_namespace_is_refused(sandbox, local_mount):
    """If the sandbox's own namespace counted as initial, nothing may run there: the check
    outside (verify) and the check inside (the entering trampoline) both refuse."""
    sandbox.initial_net = [*sandbox.initial_net, sandbox.netns]
    with pytest.raises(SandboxError, match="initial network namespace"):
        sandbox.run(["true"])
    with pytest.raises(SandboxError, match="initial network namespace"):
        sandbox.uevent_socket()
    r = _enter_unchecked(sandbox, ["true"])
    assert r.returncode == 125 and "initial network namespace" in r.stderr


def test_check_netns():
    own = os.stat("/proc/self/ns/net").st_ino
    with pytest.raises(SandboxError):
        check_netns(own, initial_netns_inodes([own]))
    with pytest.raises(SandboxError):
        check_netns(0xEFFFFFF9, [])   # init_net's fixed inode on 6.x kernels
    with pytest.raises(SandboxError, match="not the sandbox's"):
        check_netns(12345, [own], expected=54321)
    check_netns(12345, [own], expected=12345)


def test_sandbox_namespaces_are_not_the_hosts(sandbox):
    for ns in ("net", "user", "mnt", "pid"):
        assert os.stat(f"/proc/{sandbox.holder}/ns/{ns}").st_ino != os.stat(f"/proc/self/ns/{ns}").st_ino
    # its network namespace belongs to its own user namespace: the kernel sends host
    # uevents only to namespaces of the initial user namespace
    assert sandbox.userns != os.stat("/proc/self/ns/user").st_ino


def test_forwarder_socket_lives_in_the_sandbox_namespace(local_mount):
    machine, mnt = local_mount
    att = MachineSandbox(machine, mnt)
    try:
        fd = fcntl.ioctl(att.forwarder.sock.fileno(), SIOCGSKNS)
        try:
            ino = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        assert ino == att.sandbox.netns != os.stat("/proc/self/ns/net").st_ino
    finally:
        att.close()


# ---------------------------------------------------------------------- overlays

def _enter_unchecked(sb: Sandbox, argv: list[str]) -> subprocess.CompletedProcess:
    """The entering trampoline without the outside check: only the inside check guards."""
    opts = {"holder": sb.holder, "expect": sb.expectations(), "cwd": "/", "detach": False, "mounts": None}
    return subprocess.run([sys.executable, "-c", ENTER_ENTRY, json.dumps(opts), "--", *argv],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=package_parent()))


def test_overlay_removed_inside_is_refused(sandbox):
    assert sandbox.run(["true"]).returncode == 0
    r = sandbox.run(["umount", MEM])
    assert r.returncode == 0, r.stderr
    with pytest.raises(SandboxError, match=f"{MEM} is not covered by the memfs overlay"):
        sandbox.run(["true"])
    r = _enter_unchecked(sandbox, ["true"])
    assert r.returncode == 125 and f"{MEM} is not covered by the memfs overlay" in r.stderr


def test_overlay_replaced_inside_is_refused(sandbox):
    r = sandbox.run(["mount", "-t", "tmpfs", "none", "/sys/devices/system/node"])
    assert r.returncode == 0, r.stderr
    with pytest.raises(SandboxError, match="fstype tmpfs"):
        sandbox.run(["true"])
    r = _enter_unchecked(sandbox, ["true"])
    assert r.returncode == 125 and "fstype tmpfs" in r.stderr


def test_dead_daemon_gives_enotconn_not_the_real_files(tmp_path):
    with mounted(lambda: build_tree(Machine.from_config()), tmp_path, mode="process") as mnt:
        sb = Sandbox.start(mnt.path)
        try:
            assert sb.run(["cat", f"{MEM}/memory32/state"]).stdout == "offline\n"
            os.kill(mnt.pid, signal.SIGKILL)
            # the kernel aborts the FUSE connection once the daemon's /dev/fuse fd is closed
            wait_for(lambda: probe(os.fspath(mnt.path)) == "dead", what="the FUSE connection to end")
            r = sb.run(["cat", f"{MEM}/memory0/state", "/proc/meminfo"])
            assert r.returncode != 0 and r.stdout == ""
            assert r.stderr.count("Transport endpoint is not connected") == 2
        finally:
            sb.stop()


# ---------------------------------------------------------------------- root, teardown

def test_not_root_is_refused_plainly(local_mount, monkeypatch, capsys):
    _, mnt = local_mount
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SandboxError, match="needs root"):
        Sandbox.start(mnt)
    assert memfs_main(["exec", mnt, "--", "true"]) == 125
    assert "needs root" in capsys.readouterr().err


def test_stop_kills_everything_in_the_sandbox(sandbox, local_mount):
    _, mnt = local_mount
    p = sandbox.popen(["sleep", "300"])
    wait_for(lambda: sandbox_processes(sandbox, "sleep"), what="sleep to run in the sandbox")
    holder, middle = sandbox.holder, sandbox.middle
    sandbox.stop()
    assert p.wait(10) != 0            # the trampoline saw its command killed
    assert middle is not None and middle.poll() is not None
    assert not os.path.exists(f"/proc/{holder}")
    assert holders_of(mnt) == []
    with pytest.raises(SandboxError, match="stopped"):
        sandbox.run(["true"])


def test_fusermount_u_stops_the_daemons_sandbox(tmp_path):
    """Unmounting behind the daemon's back: its sandbox (whose mount namespace holds a copy
    of the mount) is stopped, so the FUSE connection ends and the daemon exits."""
    mnt = tmp_path / "mnt"
    r = memfs_cli("mount", str(mnt), "--sandbox")
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout.split("daemon pid ")[1].split(";")[0])
    try:
        assert holders_of(str(mnt))   # the holder (and the process that made its namespaces)
        subprocess.run(["fusermount", "-u", "-z", str(mnt)], check=True, timeout=30)

        def daemon_ended() -> bool:   # gone, or a zombie its parent has not reaped yet
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                return True
        wait_for(daemon_ended, what=f"daemon {pid} to exit")
        assert holders_of(str(mnt)) == []
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
        memfs_cli("umount", str(mnt))
