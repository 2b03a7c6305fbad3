"""A mounted memfs used the way people and tools use sysfs: the shell, Python's os calls,
util-linux lsmem --sysroot, and an unprivileged user."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memfs.pytest_plugin import fuse_unavailable

pytestmark = [
    pytest.mark.skipif(fuse_unavailable() is not None, reason=fuse_unavailable() or ""),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (allow_other, setpriv)"),
]

AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
REPO = Path(__file__).resolve().parents[2]


def sh(script: str, *args: str, prefix: list[str] | None = None, timeout: float = 20,
       shell: str = "sh") -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), "timeout", "-s", "KILL", str(timeout), shell, "-c", script, shell, *args],
                          capture_output=True, text=True, timeout=timeout + 5, stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------------- the shell

def test_shell_echo(memfs_mount):
    m = memfs_mount()
    state = m.memory / "memory32/state"
    r = sh('echo online > "$1"', str(state))
    assert r.returncode == 0, r.stderr
    assert state.read_text() == "online\n"
    assert next(b for b in m.status()["blocks"] if b["id"] == 32)["state"] == "online"
    # bash's echo names the errno (dash's says "I/O error" for any failed write)
    r = sh('echo garbage > "$1"', str(state), shell="bash")
    assert r.returncode != 0 and "write error: Invalid argument" in r.stderr
    r = sh('/bin/echo garbage > "$1"', str(state))  # coreutils echo, from sh
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    r = sh('echo online > "$1"', str(state), shell="bash")  # already online: the kernel says EINVAL
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    r = sh('echo x > "$1"', str(m.memory / "memory32/phys_index"))
    assert r.returncode != 0 and "Permission denied" in r.stderr  # refused at open
    r = sh('echo offline > "$1" && cat "$1"', str(state))
    assert r.returncode == 0 and r.stdout == "offline\n"
    r = sh('cat "$1"/memory32/phys_index "$1"/memory32/valid_zones', str(m.memory))
    assert r.stdout == "00000020\nNormal Movable\n"


# ---------------------------------------------------------------------- Python's os calls

def test_python_write_semantics(memfs_mount):
    m = memfs_mount()
    state = m.memory / "memory34/state"
    state.write_text("online")
    fd = os.open(state, os.O_WRONLY)  # no O_TRUNC
    try:
        assert os.write(fd, b"offline") == 7
        assert state.read_text() == "offline\n"
        assert os.lseek(fd, 0, os.SEEK_CUR) == 7
        assert os.write(fd, b"online") == 6  # at offset 7: still one whole store
        assert state.read_text() == "online\n"
        assert os.pwrite(fd, b"offline\n", 0) == 8
        assert state.read_text() == "offline\n"
        assert os.write(fd, b"") == 0  # a zero-length write stores nothing
        assert state.read_text() == "offline\n"
        with pytest.raises(OSError) as ei:
            os.write(fd, b"bogus")
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(OSError) as ei:
            os.read(fd, 10)
        assert ei.value.errno == errno.EBADF
    finally:
        os.close(fd)


def test_python_reads_in_pieces(memfs_mount):
    m = memfs_mount()
    whole = (m.path / "proc/zoneinfo").read_bytes()
    fd = os.open(m.path / "proc/zoneinfo", os.O_RDONLY)
    try:
        pieces = []
        while True:
            b = os.read(fd, 7)
            if not b:
                break
            pieces.append(b)
        assert b"".join(pieces) == whole and len(pieces) > 100
        assert os.pread(fd, 9, 0) == whole[:9]
    finally:
        os.close(fd)
    fd = os.open(m.memory / "memory33/valid_zones", os.O_RDONLY)
    try:
        assert os.read(fd, 3) + os.read(fd, 3) + os.read(fd, 100) + os.read(fd, 100) == b"Normal Movable\n"
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- lsmem

def _zones(valid_zones: str) -> str:
    return "/".join("None" if z == "none" else z for z in valid_zones.split())


def _expected(status: dict, merge: bool, detail: bool) -> list[dict]:
    rows: list[dict] = []
    for b in status["blocks"]:
        row = {"first": b["id"], "last": b["id"], "start": b["start"], "end": b["start"] + b["size"] - 1,
               "state": b["state"], "removable": b["state"] == "online"}
        if detail:
            row.update(node=b["node"], zones=_zones(b["valid_zones"]))
        key = {k: v for k, v in row.items() if k not in ("first", "last", "start", "end")}
        prev = rows[-1] if rows else None
        if merge and prev is not None and prev["last"] + 1 == b["id"] and \
                {k: v for k, v in prev.items() if k not in ("first", "last", "start", "end")} == key:
            prev["last"], prev["end"] = b["id"], row["end"]
        else:
            rows.append(row)
    return rows


def _lsmem_json(m, *args: str) -> list[dict]:
    r = subprocess.run(["lsmem", "--sysroot", str(m.path), "-J", *args], capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["memory"]


def _check(got: list[dict], want: list[dict], detail: bool) -> None:
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        assert g["range"] == f"0x{w['start']:016x}-0x{w['end']:016x}"
        assert g["block"] == (str(w["first"]) if w["first"] == w["last"] else f"{w['first']}-{w['last']}")
        assert g["state"] == w["state"]
        assert g["removable"] == w["removable"]
        if detail:
            assert g["node"] == w["node"] and g["zones"] == w["zones"], (g, w)


@pytest.mark.skipif(shutil.which("lsmem") is None, reason="lsmem (util-linux) not installed")
def test_lsmem_agrees_with_status(memfs_mount):
    m = memfs_mount()
    (m.memory / "memory32/state").write_text("online_movable")
    (m.memory / "memory34/state").write_text("online_kernel")
    (m.memory / "memory35/state").write_text("online_kernel")
    plugged = m.call("plug", size="256M", driver="virtio_mem")["blocks"]
    assert len(plugged) == 2
    s = m.status()
    cols = ["-o", "RANGE,SIZE,STATE,REMOVABLE,BLOCK,NODE,ZONES"]
    _check(_lsmem_json(m), _expected(s, merge=True, detail=False), False)
    _check(_lsmem_json(m, "-a"), _expected(s, merge=False, detail=False), False)
    _check(_lsmem_json(m, *cols), _expected(s, merge=True, detail=True), True)
    _check(_lsmem_json(m, "-a", *cols), _expected(s, merge=False, detail=True), True)
    assert all(row["size"] == "128M" for row in _lsmem_json(m, "-a"))
    # the default table and its summary
    r = subprocess.run(["lsmem", "--sysroot", str(m.path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split() == ["RANGE", "SIZE", "STATE", "REMOVABLE", "BLOCK"]
    assert "Memory block size:       128M" in r.stdout
    online = sum(b["size"] for b in s["blocks"] if b["state"] == "online")
    assert online == (8 + 3) * (128 << 20)


# ---------------------------------------------------------------------- an unprivileged user

def test_nobody_reads_but_cannot_write(memfs_mount):
    m = memfs_mount()
    state = m.memory / "memory32/state"
    r = sh('cat "$1"', str(state), prefix=AS_NOBODY)
    assert r.returncode == 0 and r.stdout == "offline\n", r.stderr
    r = sh('head -1 "$1"', str(m.path / "proc/meminfo"), prefix=AS_NOBODY)
    assert r.stdout.startswith("MemTotal:")
    r = sh('echo online > "$1"', str(state), prefix=AS_NOBODY)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert state.read_text() == "offline\n"
    if shutil.which("lsmem"):
        r = subprocess.run([*AS_NOBODY, "lsmem", "--sysroot", str(m.path)], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0 and "Memory block size:" in r.stdout, r.stderr


def _system_python() -> str | None:
    """An interpreter nobody may run (the venv's may live under root's 0700 home)."""
    for p in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        r = subprocess.run([*AS_NOBODY, p, "-I", "-c", "pass"], capture_output=True, timeout=30)
        if r.returncode == 0:
            return p
    return None


def test_control_socket_refuses_nobody(memfs_mount):
    m = memfs_mount()
    py = _system_python()
    if py is None:
        pytest.skip("no python interpreter that user nobody may run")
    sock = m.status()["control_socket"]
    probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\nsys.exit(0)\n")
    r = subprocess.run([*AS_NOBODY, py, "-I", "-c", probe, sock], capture_output=True, text=True, timeout=30)
    assert r.returncode == 13, r.stderr
    # the CLI says so, when nobody can import memfs from this checkout
    env = dict(os.environ, PYTHONPATH=str(REPO))
    ok = subprocess.run([*AS_NOBODY, py, "-c", "import memfs.cli"], capture_output=True, env=env, timeout=30,
                        cwd="/")
    if ok.returncode == 0:
        r = subprocess.run([*AS_NOBODY, py, "-m", "memfs", "plug", str(m.path), "--size", "128M"],
                           capture_output=True, text=True, env=env, timeout=30, cwd="/")
        assert r.returncode == 1 and "Permission denied on the control socket" in r.stderr, r.stderr
        assert "--control-mode" in r.stderr
    assert [d["id"] for d in m.status()["devices"]] == ["dimm1", "dimm2", "dimm3"]
