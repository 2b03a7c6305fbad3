"""`memfs mount/umount` as a user runs them: the daemon's life cycle, dead and live mounts,
exit codes, config errors, --foreground with systemd's notify protocol."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from memfs import control
from memfs.daemon import FSTYPE, MountError, mounts_at, prepare_mountpoint
from memfs.pytest_plugin import _cleanup, _pid_gone, fuse_unavailable, memfs_cli

pytestmark = [
    pytest.mark.skipif(fuse_unavailable() is not None, reason=fuse_unavailable() or ""),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (allow_other, /run/memfs)"),
]

COMMANDS = [
    ["status"], ["status", "--json"], ["plug", "--size", "128M"], ["unplug", "dimm1"],
    ["alloc", "--movable", "4M"], ["free", "1"], ["events"], ["umount"],
]


@contextlib.contextmanager
def fresh_dir() -> Iterator[Path]:
    """An empty mount point under a fresh 0755 /tmp directory; always cleaned up."""
    base = Path(tempfile.mkdtemp(prefix="memfs-test-", dir="/tmp"))
    os.chmod(base, 0o755)
    mnt = base / "mnt"
    mnt.mkdir()
    try:
        yield mnt
    finally:
        pid = None
        with contextlib.suppress(Exception):
            with control.ControlClient(mnt, timeout=5) as c:
                pid = c.call("ping")["pid"]
        _cleanup(mnt, pid)
        shutil.rmtree(base, ignore_errors=True)


def test_help_for_every_command():
    r = memfs_cli("--help")
    assert r.returncode == 0 and "exit codes: 0 ok, 1 error, 2 usage" in r.stdout
    for cmd in ("mount", "umount", "status", "plug", "unplug", "alloc", "free", "events"):
        r = memfs_cli(cmd, "--help")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"usage: memfs {cmd} ") and "MNT" in r.stdout
    assert memfs_cli().returncode == 2
    assert memfs_cli("--version").stdout.startswith("memfs ")


def test_mount_status_umount_round_trip():
    with fresh_dir() as mnt:
        t0 = time.monotonic()
        r = memfs_cli("mount", str(mnt))
        assert r.returncode == 0, r.stderr
        assert f"memfs mounted at {mnt} (daemon pid" in r.stdout
        assert mounts_at(mnt) == [FSTYPE]
        # mount returned only once the mount serves
        assert (mnt / "sys/devices/system/memory/block_size_bytes").read_text() == "8000000\n"
        assert time.monotonic() - t0 < 30
        s = json.loads(memfs_cli("status", str(mnt), "--json").stdout)
        assert s["mountpoint"] == str(mnt) and s["kernel"] == "6.1"
        pid = s["pid"]
        sock = s["control_socket"]
        assert sock == control.paths_in("/run/memfs", mnt)["sock"]
        assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
        text = memfs_cli("status", str(mnt))
        assert text.returncode == 0 and "legend:" in text.stdout
        r = memfs_cli("umount", str(mnt))
        assert r.returncode == 0, r.stderr
        assert mounts_at(mnt) == [] and _pid_gone(pid)
        assert not os.path.exists(sock)
        r = memfs_cli("status", str(mnt))
        assert r.returncode == 4


def test_dead_mount_is_cleaned_up_and_reused(memfs_mount):
    m = memfs_mount()
    old = m.pid
    m.kill()  # SIGKILL: the mount stays, its connection is gone
    for op in (os.statvfs, os.listdir):  # (stat may be answered from the kernel's attribute cache)
        with pytest.raises(OSError) as ei:
            op(m.path)
        assert ei.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # the latter if a request was in flight
    assert mounts_at(m.path) == [FSTYPE]
    r = m.cli("status")
    assert r.returncode == 4 and "a dead memfs mount is left there" in r.stderr
    r = memfs_cli("mount", str(m.path))
    assert r.returncode == 0, r.stderr
    assert mounts_at(m.path) == [FSTYPE]  # replaced, not stacked
    assert (m.memory / "memory32/state").read_text() == "offline\n"
    assert m.call("ping")["pid"] != old


def test_umount_removes_a_dead_mount(memfs_mount):
    m = memfs_mount()
    m.kill()
    r = m.cli("umount")
    assert r.returncode == 0 and "removed the dead memfs mount" in r.stdout
    assert mounts_at(m.path) == []


def test_live_mount_is_refused(memfs_mount):
    m = memfs_mount()
    r = memfs_cli("mount", str(m.path))
    assert r.returncode == 1
    assert f"{m.path} is already mounted" in r.stderr and f"memfs umount {m.path} first" in r.stderr
    assert mounts_at(m.path) == [FSTYPE]
    assert m.call("ping")["pid"] == m.pid


def test_live_memfs_without_daemon_lock_is_refused(tmp_path):
    """A memfs mount that is not ours (here: the test helper's) is live: refused, not stacked."""
    from memfs.machine.hotplug import Machine
    from memfs.sysfs.tree import build_tree
    from tests.support.fuse import mounted
    with mounted(lambda: build_tree(Machine.from_config()), tmp_path) as mnt:
        r = memfs_cli("mount", str(mnt.path))
        assert r.returncode == 1 and "already mounted (a live memfs)" in r.stderr
        assert mounts_at(mnt.path) == [FSTYPE]


def test_another_filesystem_is_refused():
    with fresh_dir() as mnt:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "memfs-test", str(mnt)], check=True, timeout=10)
        try:
            r = memfs_cli("mount", str(mnt))
            assert r.returncode == 1 and "already a mount point (tmpfs)" in r.stderr
            assert mounts_at(mnt) == ["tmpfs"]
        finally:
            subprocess.run(["umount", str(mnt)], timeout=10)


def test_nonempty_directory_is_refused():
    with fresh_dir() as mnt:
        (mnt / "file").write_text("x")
        r = memfs_cli("mount", str(mnt))
        assert r.returncode == 1 and "is not empty" in r.stderr
        assert mounts_at(mnt) == []


@pytest.mark.parametrize("path", ["/", "/sys", "/proc", "/sys/devices/system/memory", "/dev"])
def test_system_paths_are_refused_before_anything_happens(path):
    with pytest.raises(MountError, match="refusing to mount over"):
        prepare_mountpoint(path)


def test_every_command_without_memfs_exits_4():
    with fresh_dir() as mnt:
        for cmd in COMMANDS:
            r = memfs_cli(cmd[0], str(mnt), *cmd[1:])
            assert r.returncode == 4, (cmd, r.stderr)
            assert f"no memfs is mounted at {mnt}; start one with: memfs mount {mnt}" in r.stderr, cmd
        missing = mnt / "does-not-exist"
        r = memfs_cli("status", str(missing))
        assert r.returncode == 4 and f"memfs mount {missing}" in r.stderr


@pytest.mark.parametrize("args, words", [
    (["--kernel", "bogus"], "unknown profile"),
    (["--set", "hotplug.slots=999"], "hotplug.slots"),
    (["--set", "boot.bogus=1"], "unknown key"),
    (["--set", "noequals"], "expected KEY=VALUE"),
    (["--config", "/nonexistent/machine.toml"], "cannot read the machine description"),
])
def test_config_errors_exit_2(args, words):
    with fresh_dir() as mnt:
        r = memfs_cli("mount", str(mnt), *args)
        assert r.returncode == 2, r.stderr
        assert words in r.stderr
        assert mounts_at(mnt) == []


def test_bad_toml_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("kernel = [\n")
    with fresh_dir() as mnt:
        r = memfs_cli("mount", str(mnt), "--config", str(bad))
        assert r.returncode == 2 and "not valid TOML" in r.stderr


def test_config_file_kernel_and_overrides_apply(memfs_mount, tmp_path):
    from memfs.machine.config import default_text
    cfg = tmp_path / "machine.toml"
    cfg.write_text(default_text().replace("slots = 8", "slots = 4"))
    m = memfs_mount(config=cfg, kernel="6.8", sets={"boot.memhp_default_state": "online"},
                    extra=["--state", str(tmp_path / "state.json")])
    s = m.status()
    assert s["kernel"] == "6.8" and s["hotplug"]["slots"] == 4
    assert s["auto_online_blocks"] == "online" and s["config"] == str(cfg)
    assert s["state_file"] == str(tmp_path / "state.json")
    assert (m.memory / "auto_online_blocks").read_text() == "online\n"
    assert (m.memory / "crash_hotplug").read_text() == "0\n"  # a 6.6+ file


def test_control_mode_option(memfs_mount):
    m = memfs_mount(extra=["--control-mode", "0660"])
    sock = m.status()["control_socket"]
    assert os.stat(sock).st_mode & 0o777 == 0o660


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_notifies_systemd_and_unmounts_on_signal(sig):
    with fresh_dir() as mnt:
        notify_path = str(mnt.parent / "notify")
        log = mnt.parent / "daemon.log"
        # the log is a file, not a pipe: helpers the daemon starts (the sandbox) inherit it,
        # and the test is about the daemon's own exit
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns, open(log, "w") as logf:
            ns.bind(notify_path)
            ns.settimeout(30)
            env = dict(os.environ, NOTIFY_SOCKET=notify_path)
            proc = subprocess.Popen([sys.executable, "-m", "memfs", "mount", str(mnt), "--foreground"],
                                    env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
            try:
                msg = ns.recv(4096).decode()
                assert "READY=1" in msg and f"MAINPID={proc.pid}" in msg
                assert (mnt / "sys/devices/system/memory/memory32/state").read_text() == "offline\n"
                with control.ControlClient(mnt) as c:
                    assert c.call("ping")["pid"] == proc.pid
                proc.send_signal(sig)
                try:
                    rc = proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
                    pytest.fail(f"the daemon did not stop on {sig!r}:\n{log.read_text()}")
                assert rc == 0, log.read_text()
                assert "STOPPING=1" in ns.recv(4096).decode()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
        assert mounts_at(mnt) == []
        err = log.read_text()
        assert "serving" in err and "stopped serving" in err


def test_umount_with_a_file_held_open(memfs_mount):
    m = memfs_mount()
    fd = os.open(m.memory / "memory32/state", os.O_RDONLY)
    try:
        r = m.cli("umount", timeout=40)
        assert r.returncode == 0, r.stderr
        assert mounts_at(m.path) == [] and not m.alive()
        with pytest.raises(OSError) as ei:
            os.pread(fd, 100, 0)
        assert ei.value.errno in (errno.ENOTCONN, errno.ENODEV, errno.ECONNABORTED)
    finally:
        with contextlib.suppress(OSError):  # close's flush fails ENOTCONN: the fd is closed anyway
            os.close(fd)


def test_mount_creates_a_missing_directory():
    with fresh_dir() as mnt:
        sub = mnt.parent / "new"
        try:
            r = memfs_cli("mount", str(sub))
            assert r.returncode == 0, r.stderr
            assert (sub / "proc/meminfo").read_text().startswith("MemTotal:")
        finally:
            _cleanup(sub, None)
