"""Packaging: the systemd unit, the scripts CI and users run, `python -m memfs`."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from memfs.pytest_plugin import _cleanup, fuse_unavailable

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd/memfs@.service"
UDEVD_UNIT = REPO / "systemd/memfs-udevd@.service"
NO_SANDBOX = REPO / "systemd/memfs@.service.d/no-sandbox.conf"


def _unit_lines(unit: Path = UNIT) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def unit_command(line: str, env_vars: dict[str, str]) -> list[str]:
    """``python -m memfs ...`` for an Exec line of the unit, expanded as systemd does:
    ``${VAR}`` is one word, ``$VAR`` is split into words (none when empty)
    (systemd.service(5), "Command lines")."""
    line = re.sub(r"\$\{(\w+)\}", lambda m: env_vars[m.group(1)], line)
    line = re.sub(r"\$(\w+)", lambda m: env_vars.get(m.group(1), ""), line)
    words = line.split()
    assert words[0] == "/usr/local/bin/memfs"
    return [sys.executable, "-m", "memfs", *words[1:]]


def test_unit_content():
    u = _unit_lines()
    assert u["Type"] == ["notify"]
    assert u["ExecStart"] == ["/usr/local/bin/memfs mount --foreground --config ${MEMFS_CONFIG} "
                              "--state ${MEMFS_STATE} $MEMFS_SANDBOX ${MEMFS_MOUNT}"]
    assert "MEMFS_SANDBOX=" in u["Environment"]
    assert u["ExecStop"] == ["/usr/local/bin/memfs umount ${MEMFS_MOUNT}"]
    assert "MEMFS_CONFIG=/etc/memfs/%i.toml" in u["Environment"]
    assert "MEMFS_MOUNT=/run/memfs/%i" in u["Environment"]
    assert "MEMFS_STATE=/var/lib/memfs/%i.state" in u["Environment"]
    assert u["StateDirectory"] == ["memfs"] and u["StateDirectoryMode"] == ["0700"]
    assert u["Restart"] == ["on-failure"]
    assert u["DeviceAllow"] == ["/dev/fuse rwm"]
    # what the sandbox needs, and no more (tests/integration/test_systemd_nspawn.py runs it)
    assert u["RestrictNamespaces"] == ["user mnt net pid"]
    assert u["RestrictAddressFamilies"] == ["AF_UNIX AF_NETLINK"]
    assert u["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN CAP_SETUID CAP_SETGID CAP_SETFCAP"]
    comments = "\n".join(line for line in UNIT.read_text().splitlines() if line.startswith("#"))
    for grant in ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETFCAP", "AF_NETLINK"):
        assert grant in comments, f"{grant}: no comment says why"
    # the drop-in that turns the sandbox off takes every grant back
    d = _unit_lines(NO_SANDBOX)
    assert d["Environment"] == ["MEMFS_SANDBOX=--no-sandbox"]
    assert d["RestrictNamespaces"] == ["yes"]
    assert d["RestrictAddressFamilies"] == ["", "AF_UNIX"]
    assert d["CapabilityBoundingSet"] == ["", "CAP_SYS_ADMIN"]


def test_udevd_unit_content():
    u = _unit_lines(UDEVD_UNIT)
    assert u["BindsTo"] == ["memfs@%i.service"] and u["After"] == ["memfs@%i.service"]
    assert u["WantedBy"] == ["memfs@%i.service"]
    assert u["ExecStart"] == ["/usr/local/bin/memfs udevd --foreground --rules ${MEMFS_RULES} ${MEMFS_MOUNT}"]
    assert "MEMFS_RULES=/etc/memfs/%i.rules.d" in u["Environment"]
    assert u["RestrictNamespaces"] == ["user mnt net pid"]
    assert u["RestrictAddressFamilies"] == ["AF_UNIX AF_NETLINK"]
    assert u["CapabilityBoundingSet"] == [""]   # none (test_systemd_nspawn.py runs it so)
    assert u["RestartPreventExitStatus"] == ["125"]   # memfs udevd: no sandbox to run in


@pytest.mark.parametrize("unit", [UNIT, UDEVD_UNIT], ids=lambda p: p.name)
def test_units_share_the_hosts_mounts(unit):
    """Options that would run the service in a private mount namespace, where the FUSE
    mount (or, for the companion, the mount it joins) would not be the host's."""
    u = _unit_lines(unit)
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ReadWritePaths",
                "ProtectKernelTunables", "MountFlags", "PrivateMounts"):
        assert key not in u


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    exe = shutil.which("memfs") or str(Path(sys.executable).with_name("memfs"))
    if not os.access(exe, os.X_OK):
        exe = "/bin/true"
    text = UNIT.read_text().replace("/usr/local/bin/memfs", exe)
    for name in ("memfs@.service", "memfs@lab.service"):
        (tmp_path / name).write_text(text)
    (tmp_path / "memfs-udevd@.service").write_text(UDEVD_UNIT.read_text().replace("/usr/local/bin/memfs", exe))
    (tmp_path / "memfs@lab.service.d").mkdir()
    (tmp_path / "memfs@lab.service.d/no-sandbox.conf").write_text(NO_SANDBOX.read_text())
    for unit in ("memfs@lab.service", "memfs-udevd@.service"):
        r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    # and it does complain about a broken unit
    (tmp_path / "memfs@bad.service").write_text(text.replace("Type=notify", "Type=notifyy"))
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "memfs@bad.service")],
                       capture_output=True, text=True, timeout=60)
    assert "notifyy" in r.stderr


@pytest.mark.skipif(fuse_unavailable() is not None, reason=fuse_unavailable() or "")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_unit_command_lines_work_like_systemd_runs_them():
    """ExecStart under a notify socket until READY=1, then ExecStop: the daemon exits 0."""
    from memfs.daemon import FSTYPE, mounts_at
    from memfs.machine.config import default_text
    u = _unit_lines()
    base = Path(tempfile.mkdtemp(prefix="memfs-test-", dir="/tmp"))
    env_vars = {"MEMFS_MOUNT": str(base / "run/lab"), "MEMFS_CONFIG": str(base / "lab.toml"),
                "MEMFS_STATE": str(base / "lab.state")}
    Path(env_vars["MEMFS_CONFIG"]).write_text(default_text())

    proc = None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
            ns.bind(str(base / "notify"))
            ns.settimeout(30)
            proc = subprocess.Popen(unit_command(u["ExecStart"][0], env_vars), env=dict(os.environ, NOTIFY_SOCKET=str(base / "notify")),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
            msg = ns.recv(4096).decode()
            if "READY=1" not in msg:
                proc.kill()
                pytest.fail(f"no READY=1 but {msg!r}; daemon said:\n{proc.communicate(timeout=10)[1]}")
            assert (Path(env_vars["MEMFS_MOUNT"]) / "sys/devices/system/memory/memory32").is_dir()
            stop = subprocess.run(unit_command(u["ExecStop"][0], env_vars), capture_output=True, text=True, timeout=60)
            assert stop.returncode == 0, stop.stderr
            assert proc.wait(30) == 0
        assert mounts_at(env_vars["MEMFS_MOUNT"]) == [] or FSTYPE not in mounts_at(env_vars["MEMFS_MOUNT"])
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        _cleanup(Path(env_vars["MEMFS_MOUNT"]), None)
        shutil.rmtree(base, ignore_errors=True)


def test_ci_entry_point():
    ci = REPO / ".ci/run"
    lines = ci.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    assert lines[-1] == "exec ./scripts/test"
    for p in (ci, REPO / "scripts/run", REPO / "scripts/test"):
        assert os.access(p, os.X_OK), p


def test_scripts_parse_and_find_python():
    for p in ("scripts/setup.sh", "scripts/run", "scripts/test", ".ci/run"):
        r = subprocess.run(["bash", "-n", str(REPO / p)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, (p, r.stderr)
    r = subprocess.run(["bash", "-c", 'source scripts/setup.sh && memfs_python && echo "$memfs_root"'],
                       cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    py, root = r.stdout.split()
    assert root == str(REPO)
    assert subprocess.run([py, "-c", "import tomllib"], timeout=30).returncode == 0


def test_python_dash_m_memfs():
    r = subprocess.run([sys.executable, "-m", "memfs", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("usage: memfs ")
