"""Helpers of the reliability tests (tests/integration/test_reliability_*.py).

* :func:`daemon` mounts a real memfs daemon (``python -m memfs mount``) on a fresh 0755
  directory under /tmp, with any extra arguments and environment, and always tears it
  down: ``memfs umount``, then ``fusermount -u -z`` and SIGKILL of the daemon pid it
  started (never anything else). A watchdog kills a daemon that outlives its test.
* :class:`Reference` is the same machine in the test process: the model is
  deterministic, so applying the same writes and control requests to it must give the
  same outcomes, and in the end the same state digest, as the daemon.
* :func:`invariants` checks the accounting identities on a ``memfs status`` snapshot.
* :func:`log_problems` lists what must never appear in a daemon log.
* :data:`FIGURES` collects the numbers docs/reliability.md quotes;
  every test adds to it, and the run's totals go to ``$MEMFS_RELIABILITY_FIGURES``
  (default ``/tmp/memfs-reliability-figures.json``) at the end of the session.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from memfs import control
from memfs.pytest_plugin import _cleanup, _pid_gone, fuse_unavailable, memfs_cli
from memfs.testing.mount import mount_log

FIGURES: dict[str, int] = {}


def count(key: str, n: int = 1) -> None:
    FIGURES[key] = FIGURES.get(key, 0) + n


def write_figures() -> None:
    if not FIGURES:
        return
    path = os.environ.get("MEMFS_RELIABILITY_FIGURES", "/tmp/memfs-reliability-figures.json")
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps(dict(sorted(FIGURES.items())), indent=2) + "\n")


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


# ---------------------------------------------------------------------- a daemon

@dataclass
class Daemon:
    path: Path
    base: Path
    args: list[str]
    env: dict[str, str]
    pid: int | None = None
    pids: list[int] = field(default_factory=list)  # every daemon this object started

    @property
    def memory(self) -> Path:
        return self.path / "sys/devices/system/memory"

    def mount(self, *extra: str, check: bool = True) -> Any:
        r = memfs_cli("mount", os.fspath(self.path), *self.args, *extra, env=self.env, timeout=120)
        if check and r.returncode != 0:
            raise AssertionError(f"memfs mount failed ({r.returncode}): {r.stderr}\n{self.log()[-3000:]}")
        if r.returncode == 0:
            self.pid = self.call("ping")["pid"]
            self.pids.append(self.pid)
        return r

    def client(self, timeout: float = 60) -> control.ControlClient:
        return control.ControlClient(self.path, timeout=timeout)

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        with self.client() as c:
            return c.call(op, **fields)

    def status(self) -> dict[str, Any]:
        return self.call("status")["status"]

    def digest(self) -> str:
        return self.call("state", digest=True)["digest"]

    def log(self) -> str:
        return mount_log(self.path)

    def kill(self) -> None:
        """SIGKILL our daemon; the dead mount stays (ENOTCONN)."""
        pid = self.pid
        if pid is None:
            return
        if not _pid_gone(pid):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while not _pid_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _pid_gone(pid), f"daemon {pid} did not die"
        self.pid = None

    def umount(self) -> Any:
        r = memfs_cli("umount", os.fspath(self.path), timeout=60)
        self.pid = None
        return r


@contextlib.contextmanager
def daemon(*args: str, env: dict[str, str] | None = None, mount: bool = True,
           watchdog: float = 400.0) -> Iterator[Daemon]:
    """A memfs daemon with ``args`` (e.g. ``--no-sandbox``, ``--state F``) and extra ``env``."""
    reason = fuse_unavailable()
    if reason:
        import pytest
        pytest.skip(f"cannot mount memfs here: {reason}")
    base = Path(tempfile.mkdtemp(prefix="memfs-rel-", dir="/tmp"))
    os.chmod(base, 0o755)
    d = Daemon(base / "mnt", base, list(args), dict(os.environ, **(env or {})))
    d.path.mkdir()
    timer: threading.Timer | None = None

    def teardown() -> None:
        for pid in [d.pid] + d.pids:
            _cleanup(d.path, pid)
            if pid is not None and not _pid_gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    try:
        timer = threading.Timer(watchdog, teardown)
        timer.daemon = True
        timer.start()
        if mount:
            d.mount()
        yield d
    finally:
        if timer is not None:
            timer.cancel()
        teardown()
        shutil.rmtree(base, ignore_errors=True)


def log_problems(text: str) -> list[str]:
    """Lines that must never appear in a daemon log: tracebacks, errors, uncaught exceptions."""
    bad = []
    for line in text.splitlines():
        if ("Traceback" in line or " ERROR " in line or " CRITICAL " in line or "Uncaught" in line
                or "returning EIO" in line or "internal error" in line):
            bad.append(line)
    return bad


# ---------------------------------------------------------------------- the reference model

class Reference:
    """The daemon's machine, in this process (same description, same inputs)."""

    def __init__(self, config: str | None = None, **kw: Any) -> None:
        from memfs.machine.config import load_config
        from memfs.machine.hotplug import Machine
        from memfs.sysfs.tree import build_tree
        self.cfg = load_config(config, **kw)
        self.m = Machine(self.cfg)
        self.tree = build_tree(self.m)
        self.handler = control.Handler(self.m)

    def resolve(self, rel: str) -> Any:
        """The node at MNT-relative path ``rel``, following symlinks like the VFS."""
        from tests.conformance.replayer import resolve
        return resolve(self.tree, "/" + rel.lstrip("/"))

    def write(self, rel: str, data: bytes) -> int | None:
        """What write(2) of ``data`` to ``rel`` gives: None (success) or the errno."""
        node = self.resolve(rel)
        if not data:
            return None
        if not node.is_alive():
            return errno.ENODEV
        try:
            node.store(data[:4096])
        except OSError as e:
            return e.errno
        return None

    def request(self, line: bytes | str) -> dict[str, Any]:
        return self.handler.handle_line(line)

    def digest(self) -> str:
        from memfs.persist import digest
        return digest(self.m)


def writable_files(tree: Any, limit_blocks: Sequence[int] | None = None) -> list[str]:
    """MNT-relative paths of every writable attribute (block directories: only ``limit_blocks``)."""
    from memfs.sysfs.kernfs import Attr, DirNode
    out: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, DirNode):
            for name, child in node.entries():
                if name.startswith("memory") and name[6:].isdigit() and limit_blocks is not None \
                        and int(name[6:]) not in limit_blocks:
                    continue
                walk(child, f"{path}/{name}" if path else name)
        elif isinstance(node, Attr) and node.writable:
            out.append(path)
    walk(tree.root, "")
    return out


# ---------------------------------------------------------------------- invariants

def invariants(s: dict[str, Any]) -> list[str]:
    """Accounting identities of a ``memfs status`` snapshot (taken under the hotplug lock)."""
    bad: list[str] = []
    kb = s["page_size"] // 1024
    blocks = {b["id"]: b for b in s["blocks"]}
    total_managed = 0
    for n in s["nodes"]:
        zones = {z["name"]: z for z in n["zones"]}
        online = [b for b in s["blocks"] if b["state"] == "online" and b["node"] == n["id"]]
        single: dict[str, int] = {}
        multi = 0
        for b in online:
            if len(b["zones"]) == 1:
                single[b["zones"][0]] = single.get(b["zones"][0], 0) + b["present_pages"]
            else:
                multi += b["present_pages"]
        for name, z in zones.items():
            if z["present"] < single.get(name, 0):
                bad.append(f"node {n['id']} {name}: present {z['present']} < online blocks' {single.get(name, 0)}")
            if z["free"] != z["managed"] - z["used"] or z["free"] < 0:
                bad.append(f"node {n['id']} {name}: free {z['free']} != managed - used")
            if z["present"] == 0 and (z["managed"] or z["vmemmap"]):
                bad.append(f"node {n['id']} {name}: managed/vmemmap without present pages")
        present = sum(z["present"] for z in zones.values())
        if present != sum(single.values()) + multi:
            bad.append(f"node {n['id']}: present {present} != sum over online blocks {sum(single.values()) + multi}")
        managed = sum(z["managed"] for z in zones.values())
        expect = sum(b["present_pages"] - b["vmemmap_pages"] - b["reserved_pages"] for b in online)
        if managed != expect:
            bad.append(f"node {n['id']}: managed {managed} != sum(present - vmemmap - reserved) {expect}")
        if n["managed"] != managed or n["present"] != present:
            bad.append(f"node {n['id']}: node totals differ from its zones")
        if n["MemTotal"] != managed * kb:
            bad.append(f"node {n['id']}: MemTotal {n['MemTotal']} != managed {managed} * {kb}")
        if sorted(b["id"] for b in s["blocks"] if n["id"] in b["nodes"]) != n["blocks"]:
            bad.append(f"node {n['id']}: its block links differ from the blocks")
        total_managed += managed
        used = sum(z["used"] for z in zones.values())
        blk_used = sum(b["unmovable_pages"] + b["movable_pages"] + b["hwpoison_pages"] for b in online)
        if used != blk_used:
            bad.append(f"node {n['id']}: zones' used {used} != online blocks' unmovable+movable+poisoned {blk_used}")
    if s["meminfo"]["MemTotal"] != total_managed * kb:
        bad.append(f"MemTotal {s['meminfo']['MemTotal']} != sum managed {total_managed} * {kb}")
    alloc_pages = sum(a["pages"] for a in s["allocations"])
    placed = sum(b["unmovable_pages"] + b["movable_pages"] for b in s["blocks"])
    if alloc_pages != placed:
        bad.append(f"allocations hold {alloc_pages} pages, blocks {placed}")
    for a in s["allocations"]:
        if sum(a["blocks"].values()) != a["pages"]:
            bad.append(f"allocation {a['id']}: pieces do not add up")
        for b in a["blocks"]:
            if int(b) not in blocks or blocks[int(b)]["state"] != "online":
                bad.append(f"allocation {a['id']} has pages in block {b}, which is not online")
    for b in s["blocks"]:
        if b["state"] == "online" and b["free_pages"] < 0:
            bad.append(f"block {b['id']}: negative free pages")
        if b["online"] != (b["state"] == "online"):
            bad.append(f"block {b['id']}: online {b['online']} but state {b['state']}")
    slots = sum(1 for d in s["devices"] if d["slot"] is not None)
    if slots != s["hotplug"]["slots_used"]:
        bad.append(f"{slots} ACPI devices, {s['hotplug']['slots_used']} slots used")
    for d in s["devices"]:
        for b in d["blocks"]:
            if b not in blocks or blocks[b]["device"] != d["id"]:
                bad.append(f"device {d['id']}: block {b} is not its own")
    return bad


def pwrite(path, data: bytes, offset: int = 0) -> int | None:
    """open(O_WRONLY) + one pwrite + close; None on success, else the errno (open's or pwrite's)."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        return e.errno
    try:
        n = os.pwrite(fd, data, offset)
        assert n == len(data), (n, len(data))
        return None
    except OSError as e:
        return e.errno
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
