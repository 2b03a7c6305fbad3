"""memfs@.service and memfs-udevd@.service under a real systemd: Debian 12 (systemd 252)
booted in systemd-nspawn with the units installed as docs/sandbox.md says.

Checked: start with READY=1, a write kept across `systemctl restart` and `kill -9` (the
automatic restart), `memfs exec` in the service's sandbox, a udev rule of the companion
onlining a hot-added block, the daemon's own reason when a unit setting forbids the
sandbox, and `systemctl stop` leaving no mount and no process.

The root (debootstrap of bookworm, ~1 minute, needs the Debian mirror) is cached in
$MEMFS_NSPAWN_CACHE (default /var/tmp/memfs-nspawn) and booted read-only with a tmpfs
overlay (--volatile=overlay), so every run starts from the same clean root. The container
has no network: memfs, fusepy and psutil go in as wheels built outside. The flags that make
systemd enforce DevicePolicy inside (unified cgroup hierarchy, CAP_BPF, CAP_PERFMON,
CAP_NET_ADMIN, the bpf system call) are set below: without them DevicePolicy is silently
not enforced. The test skips, saying why, where no container can boot.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from memfs.machine.config import default_text
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("MEMFS_NSPAWN_CACHE", "/var/tmp/memfs-nspawn"))
#: what the cached root holds; a new name when the list changes
PACKAGES = ("systemd", "systemd-sysv", "dbus", "udev", "fuse", "libfuse2", "python3", "python3-pip",
            "procps", "util-linux")
ROOT = CACHE / "bookworm-1"
MIRROR = os.environ.get("MEMFS_DEBIAN_MIRROR", "http://deb.debian.org/debian")

MNT = "/run/memfs/test"
MEM = f"{MNT}/sys/devices/system/memory"
ONLINE_RULE = 'SUBSYSTEM=="memory", ACTION=="add", ATTR{state}=="offline", ATTR{state}="online"\n'


def why_no_container() -> str | None:
    if os.geteuid() != 0:
        return "booting a container needs root"
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} missing (apt-get install systemd-container util-linux)"
    if not ROOT.is_dir() and shutil.which("debootstrap") is None:
        return f"no cached root at {ROOT} and no debootstrap (apt-get install debootstrap)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse missing"
    return None


pytestmark = pytest.mark.skipif(why_no_container() is not None, reason=why_no_container() or "")


def build_root() -> None:
    """debootstrap the root once (under a lock: parallel runs share it), then rename it into
    place, so a half-made root is never used."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ROOT.is_dir():
            return
        tmp = Path(tempfile.mkdtemp(prefix="building-", dir=CACHE))
        try:
            r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                                "bookworm", str(tmp), MIRROR], capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                pytest.skip(f"debootstrap of bookworm from {MIRROR} failed (no network?): "
                            f"{(r.stdout + r.stderr).strip().splitlines()[-1:]}")
            # the container's own udevd and getty have nothing to do and only slow the boot
            for unit in ("systemd-udevd.service", "console-getty.service", "getty@tty1.service"):
                (tmp / "etc/systemd/system" / unit).unlink(missing_ok=True)
                (tmp / "etc/systemd/system" / unit).symlink_to("/dev/null")
            tmp.rename(ROOT)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """memfs (this tree), fusepy and psutil as wheels: the container installs them offline."""
    out = tmp_path_factory.mktemp("wheels")
    # a copy of the sources: building in the tree would leave build/ behind, and a stale
    # build/ there would put files into the wheel that the tree no longer has
    src = tmp_path_factory.mktemp("src") / "memfs"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", "mnt", "bench-results"))
    for args in (["--no-deps", str(src)], ["fusepy", "psutil"]):
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(out), *args],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            pytest.skip(f"cannot build the wheels to install in the container: {r.stderr.strip()[-300:]}")
    return out


class Container:
    """A booted systemd-nspawn container; ``run`` executes a command in it (nsenter)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.leader = 0

    def find_leader(self) -> int:
        """The container's pid 1: the child of systemd-nspawn that runs systemd."""
        for p in os.listdir("/proc"):
            if p.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    stat = Path(f"/proc/{p}/stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid and "(systemd)" in stat:
                        return int(p)
        return 0

    def run(self, *argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "--root", "--wd", "--", *argv],
                           capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check:
            assert r.returncode == 0, f"{argv} exited {r.returncode}:\n{r.stdout}{r.stderr}"
        return r

    def sh(self, script: str) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script)

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout

    def processes(self) -> list[str]:
        """``pid args`` of every process in the container (but this ps)."""
        out = self.run("ps", "-eo", "pid=,args=").stdout.splitlines()
        return [line.strip() for line in out if "ps -eo" not in line]


@pytest.fixture(scope="module")
def container(wheels: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """One booted container for the module, memfs installed (install_memfs)."""
    build_root()
    log = tmp_path_factory.mktemp("nspawn") / "nspawn.log"
    env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
    argv = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "-D", str(ROOT),
            "--volatile=overlay", f"--machine=memfs-test-{os.getpid()}",
            "--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN", "--private-network",
            "--system-call-filter=bpf", "--bind=/dev/fuse", f"--bind-ro={wheels}:/memfs-wheels",
            "--console=read-only", "--boot"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    c = Container(proc)
    try:
        def booted() -> bool:
            if proc.poll() is not None:
                pytest.skip(f"systemd-nspawn cannot boot a container here (exit {proc.returncode}): "
                            f"{log.read_text(errors='replace').strip()[-500:]}")
            c.leader = c.leader or c.find_leader()
            if not c.leader:
                return False
            r = c.run("systemctl", "is-system-running", check=False, timeout=20)
            return r.stdout.strip() in ("running", "degraded")
        try:
            wait_for(booted, timeout=90, what="the container to boot", interval=0.2)
        except AssertionError:
            pytest.skip(f"the container did not finish booting in 90 s: "
                        f"{log.read_text(errors='replace').strip()[-500:]}")
        install_memfs(c)
        yield c
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)   # nspawn: an orderly shutdown of the container
            try:
                proc.wait(45)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)


def install_memfs(c: Container) -> None:
    """As docs/sandbox.md says: pip install memfs, the units, the machine and its rules."""
    c.run("python3", "-m", "pip", "install", "-q", "--no-index", "--find-links", "/memfs-wheels",
          "--break-system-packages", "--root-user-action=ignore", "memfs", timeout=180)
    units = {"memfs@.service": (REPO / "systemd/memfs@.service").read_text(),
             "memfs-udevd@.service": (REPO / "systemd/memfs-udevd@.service").read_text()}
    files = {f"/etc/systemd/system/{name}": text for name, text in units.items()}
    files["/etc/memfs/test.toml"] = files["/etc/memfs/tight.toml"] = default_text()
    files["/etc/memfs/test.rules.d/40-memory.rules"] = ONLINE_RULE
    for path, text in files.items():
        c.run("mkdir", "-p", os.path.dirname(path))
        c.run("python3", "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", path, text)
    c.run("systemctl", "daemon-reload")


def memfs_pids(c: Container) -> list[str]:
    return [p for p in c.processes() if "memfs" in p or "systemd-udevd" in p]


def test_units_under_a_booted_systemd(container: Container) -> None:
    c = container
    # the container enforces DevicePolicy= (without the flags above it silently would not),
    # so DevicePolicy=closed + DeviceAllow=/dev/fuse of the unit are really tested
    r = c.run("systemd-run", "--wait", "--pipe", "--quiet", "-p", "DevicePolicy=strict",
              "head", "-c0", "/dev/null", check=False)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stderr

    # start: Type=notify, so `systemctl start` returns once the daemon sent READY=1
    c.run("systemctl", "start", "memfs@test")
    assert c.show("memfs@test", "ActiveState") == "active"
    assert c.show("memfs@test", "StatusText") == f"serving {MNT}"   # sd_notify STATUS=, with READY=1
    sandbox = json.loads(c.run("memfs", "status", MNT, "--json").stdout)["sandbox"]
    assert sandbox["running"] is True, sandbox

    # a write, kept across restart and kill -9 (the state file; Restart=on-failure)
    c.sh(f"echo online > {MEM}/memory32/state")
    c.run("systemctl", "restart", "memfs@test")
    assert c.read(f"{MEM}/memory32/state") == "online\n"
    pid = c.show("memfs@test", "MainPID")
    c.run("kill", "-9", pid)
    wait_for(lambda: c.show("memfs@test", "MainPID") not in ("0", pid)
             and c.show("memfs@test", "ActiveState") == "active", timeout=60,
             what="systemd to restart memfs@test after kill -9")
    assert c.show("memfs@test", "NRestarts") == "1"
    assert c.read(f"{MEM}/memory32/state") == "online\n"

    # memfs exec in the service's sandbox: the real paths are the machine's
    r = c.run("memfs", "exec", MNT, "--", "cat", "/sys/devices/system/memory/memory32/state",
              "/sys/devices/system/memory/memory33/state")
    assert r.stdout == "online\noffline\n"
    assert c.run("memfs", "exec", MNT, "--", "lsmem", "-b", "-n", "-o", "RANGE").returncode == 0

    # the companion: a udev rule onlines a hot-added block
    c.run("systemctl", "enable", "--now", "memfs-udevd@test")
    wait_for(lambda: c.run("memfs", "exec", MNT, "--", "udevadm", "control", "--ping", "--timeout=2",
                           check=False).returncode == 0, timeout=30, what="the companion's udevd")
    assert "dimm4: memory42 (offline)" in c.run("memfs", "plug", MNT, "--size", "128M").stdout
    wait_for(lambda: c.read(f"{MEM}/memory42/state") == "online\n", timeout=30,
             what="the companion's udev rule to online memory42")
    assert c.show("memfs-udevd@test", "ActiveState") == "active"
    # a restart of the machine restarts the companion too (BindsTo= stops it, the
    # WantedBy= of `systemctl enable` starts it again), with the rules
    udevd_pid = c.show("memfs-udevd@test", "MainPID")
    c.run("systemctl", "restart", "memfs@test")
    wait_for(lambda: c.show("memfs-udevd@test", "MainPID") not in ("0", udevd_pid), timeout=30,
             what="memfs-udevd@test to start again with memfs@test")
    wait_for(lambda: c.run("memfs", "exec", MNT, "--", "udevadm", "control", "--ping", "--timeout=2",
                           check=False).returncode == 0, timeout=30, what="the companion's new udevd")
    assert "dimm5: memory43 (offline)" in c.run("memfs", "plug", MNT, "--size", "128M").stdout
    wait_for(lambda: c.read(f"{MEM}/memory43/state") == "online\n", timeout=30,
             what="the restarted companion to online memory43")

    # stop: no mount, no process (the companion stops with it: BindsTo=)
    c.run("systemctl", "stop", "memfs@test")
    assert c.show("memfs-udevd@test", "ActiveState") == "inactive"
    assert c.show("memfs@test", "ActiveState") == "inactive"
    assert " fuse.memfs " not in c.read("/proc/self/mountinfo")
    assert memfs_pids(c) == []


def test_the_daemon_says_which_unit_setting_forbids_the_sandbox(container: Container) -> None:
    c = container
    mnt, dropin = "/run/memfs/tight", "/etc/systemd/system/memfs@tight.service.d"
    c.run("mkdir", "-p", dropin)
    c.sh(f"printf '[Service]\\nRestrictNamespaces=yes\\n' > {dropin}/tight.conf && systemctl daemon-reload")
    c.run("systemctl", "start", "memfs@tight")
    r = c.run("memfs", "exec", mnt, "--", "true", check=False)
    assert r.returncode == 125
    assert r.stderr == (f"memfs: no sandbox for {mnt}: the daemon could not start it: sandbox holder "
                        f"failed: [Errno 1] unshare(0x10000000): Operation not permitted (the unit's "
                        f"RestrictNamespaces= must allow user mnt net pid; or user namespaces are "
                        f"disabled (sysctl user.max_user_namespaces))\n")
    # the companion says the same in its journal, and does not retry (exit 125)
    c.run("mkdir", "-p", "/etc/memfs/tight.rules.d")
    c.run("systemctl", "start", "memfs-udevd@tight")
    wait_for(lambda: c.show("memfs-udevd@tight", "ActiveState") == "failed", timeout=30,
             what="memfs-udevd@tight to fail")
    assert (c.show("memfs-udevd@tight", "ExecMainStatus"), c.show("memfs-udevd@tight", "NRestarts")) == ("125", "0")
    journal = c.run("journalctl", "-u", "memfs-udevd@tight", "-o", "cat").stdout
    assert f"memfs: no sandbox for {mnt}: the daemon could not start it: sandbox holder failed: " in journal
    # the shipped drop-in: no sandbox, on purpose, and said so
    c.run("python3", "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
          f"{dropin}/no-sandbox.conf", (REPO / "systemd/memfs@.service.d/no-sandbox.conf").read_text())
    c.run("systemctl", "daemon-reload")
    c.run("systemctl", "restart", "memfs@tight")
    r = c.run("memfs", "status", mnt)
    assert "sandbox: none (it was mounted with --no-sandbox)" in r.stdout
    c.run("systemctl", "stop", "memfs@tight")
    assert " fuse.memfs " not in c.read("/proc/self/mountinfo")
    assert memfs_pids(c) == []
