"""Least privilege: an unprivileged user (nobody, no groups) reads what sysfs lets anyone
read and nothing else: every write fails EACCES, write-only files cannot be read, nothing
can be created, and the control channel refuses them. Every symlink of the mount stays in
the mount. No control op takes a host path, and the daemon holds no file a client named."""
from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from memfs import control
from tests.support.fuse import AS_NOBODY
from tests.support.reliability import count, daemon, log_problems

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, allow_other, setpriv)"),
              pytest.mark.usefixtures("reliability_figures")]

MEM = "sys/devices/system/memory"

#: runs as nobody: walk MNT, try to read every file and to open it for writing, try to create
NOBODY_WALK = r"""
import errno, json, os, sys
mnt = sys.argv[1]
out = {"files": {}, "dirs": 0, "create": None, "mkdir": None}
def err(e): return errno.errorcode.get(e.errno, str(e.errno))
for root, dirs, files in os.walk(mnt):
    out["dirs"] += 1
    for name in files:
        p = os.path.join(root, name)
        if os.path.islink(p):
            continue
        r = {}
        try:
            with open(p, "rb") as f:
                f.read()
            r["read"] = "ok"
        except OSError as e:
            r["read"] = err(e)
        try:
            fd = os.open(p, os.O_WRONLY)
            os.close(fd)
            r["write"] = "ok"
        except OSError as e:
            r["write"] = err(e)
        out["files"][os.path.relpath(p, mnt)] = r
for key, fn in (("create", lambda: os.open(os.path.join(mnt, "sys/new"), os.O_CREAT | os.O_WRONLY, 0o666)),
                ("mkdir", lambda: os.mkdir(os.path.join(mnt, "sys/newdir")))):
    try:
        fn()
        out[key] = "ok"
    except OSError as e:
        out[key] = err(e)
print(json.dumps(out))
"""




@pytest.fixture(scope="module")
def d():
    with daemon(mount=False) as d:
        d.args = ["--no-sandbox", "--set", "probe=true", "--state", str(d.base / "machine.state")]
        d.mount()
        (d.memory / "memory32/state").write_text("online")
        d.call("plug", size="256M", driver="virtio_mem", id="vm")
        yield d
        assert not log_problems(d.log()), log_problems(d.log())[:5]


def test_nobody_reads_what_sysfs_lets_anyone_read_and_writes_nothing(d):
    r = subprocess.run([*AS_NOBODY, "/usr/bin/python3", "-c", NOBODY_WALK, str(d.path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    files = out["files"]
    assert len(files) > 300 and out["dirs"] > 50
    for rel, res in files.items():
        mode = stat.S_IMODE(os.stat(d.path / rel).st_mode)
        assert not mode & 0o022, (rel, oct(mode))  # no file is writable by group or others
        assert res["write"] == "EACCES", (rel, res)
        if mode & 0o004:
            # readable by anyone; only runtime-PM autosuspend has nothing to show (EIO, as on Linux)
            assert res["read"] == "ok" or (res["read"] == "EIO" and rel.endswith("autosuspend_delay_ms")), (rel, res)
        else:
            assert res["read"] == "EACCES", (rel, res)
    wo = [rel for rel in files if not stat.S_IMODE(os.stat(d.path / rel).st_mode) & 0o444]
    assert {f"{MEM}/hard_offline_page", f"{MEM}/soft_offline_page", f"{MEM}/probe"} <= set(wo)
    assert out["create"] == "EACCES" and out["mkdir"] in ("EACCES", "EPERM")
    count("files checked as an unprivileged user", len(files))


def test_modes_match_the_real_sysfs_where_it_has_the_file(d):
    """Only stat(2) of the host's /sys: never a write."""
    real = Path("/sys/devices/system/memory")
    if not (real / "memory0").is_dir():
        pytest.skip("this host has no memory hotplug sysfs")
    pairs = [name for name in ("auto_online_blocks", "block_size_bytes", "hard_offline_page", "soft_offline_page",
                               "probe", "uevent") if (real / name).exists()]
    pairs += [f"memory0/{n}" for n in ("state", "online", "phys_index", "phys_device", "removable", "valid_zones",
                                       "uevent") if (real / "memory0" / n).exists()]
    assert len(pairs) >= 8
    for rel in pairs:
        want = stat.S_IMODE(os.stat(real / rel).st_mode)
        got = stat.S_IMODE(os.stat(d.memory / rel).st_mode)
        assert got == want, (rel, oct(got), oct(want))


def test_control_channel_refuses_nobody(d):
    sock = d.status()["control_socket"]
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600 and os.stat(sock).st_uid == 0
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    for args in (["status"], ["plug", "--size", "128M"], ["unplug", "vm"], ["umount"]):
        r = subprocess.run([*AS_NOBODY, sys.executable, "-m", "memfs", args[0], str(d.path), *args[1:]],
                           capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 1 and "Permission denied" in r.stderr, (args, r.returncode, r.stderr)
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
             "try:\n s.connect(sys.argv[1]); print('connected')\nexcept OSError as e: print(e.errno)")
    r = subprocess.run([*AS_NOBODY, "/usr/bin/python3", "-c", probe, sock], capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == str(errno.EACCES)
    assert "vm" in [x["id"] for x in d.status()["devices"]]  # nothing changed


def test_every_symlink_stays_inside_the_mount(d):
    mnt = str(d.path)
    links = 0
    dangling = set()
    for root, dirs, files in os.walk(mnt):
        for name in dirs + files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                continue
            target = os.readlink(p)
            assert not target.startswith("/"), (p, target)
            resolved = os.path.realpath(p)
            assert resolved.startswith(mnt + "/"), (p, target, resolved)
            if not os.path.exists(resolved):
                dangling.add((name, target))
            links += 1
    assert links > 50
    # the one dangling link, inside the tree still: memfs has no /sys/bus/node (yet)
    assert dangling <= {("subsystem", "../../../../bus/node")}, dangling
    count("symlinks checked", links)


def test_no_control_op_takes_a_host_path(d):
    """The reviewed list of ops and fields: a new op or field fails this test until reviewed."""
    assert control._FIELDS == {
        "ping": set(), "status": {"format"}, "shutdown": set(), "state": {"digest"},
        "plug": {"size", "node", "addr", "id", "driver", "memmap_on_memory", "requested"}, "unplug": {"id"},
        "resize": {"id", "size"},  # a device id and a byte count
        "alloc": {"kind", "size", "node", "block"}, "free": {"id"}, "events": {"since", "wait"},
    }
    # path-like values where strings are taken: just names or sizes, never opened
    with d.client() as c:
        for fields in ({"op": "plug", "size": "128M", "id": "/etc/shadow"}, {"op": "unplug", "id": "/etc/passwd"},
                       {"op": "plug", "size": "/etc/shadow"}, {"op": "alloc", "kind": "/etc/shadow", "size": "4K"},
                       {"op": "plug", "size": "128M", "driver": "/etc/passwd"}, {"op": "status", "path": "/etc/shadow"},
                       {"op": "state", "file": "/etc/shadow"}):
            c.request(fields)
    held = []
    for fd in os.listdir(f"/proc/{d.pid}/fd"):
        try:
            held.append(os.readlink(f"/proc/{d.pid}/fd/{fd}"))
        except OSError:
            pass
    paths = {h for h in held if h.startswith("/")}
    run_dir = os.path.dirname(d.status()["control_socket"])
    allowed = {"/dev/fuse", "/dev/null", str(d.base / "machine.state")}
    for p in paths:
        assert p in allowed or p.startswith(run_dir + "/") or p.startswith("/memfd:"), (p, sorted(paths))
    assert not any("shadow" in h or "passwd" in h for h in held)
    assert str(d.base / "machine.state") in paths
