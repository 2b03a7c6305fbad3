"""memfs uevents as real consumers see them inside the sandbox: a real systemd-udevd with
rules, udevadm monitor, pyudev (libudev), the uevent helper and `memfs monitor`; none of
them ever in the host's network namespace. Also measures delivery latency."""
from __future__ import annotations

import json
import os
import queue
import select
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from memfs.machine.hotplug import Machine
from memfs.sandbox import MachineSandbox, Sandbox
from memfs.sysfs.tree import build_tree
from memfs.testing.machine import memfs_machine_cm
from memfs.testing.mount import fuse_unavailable
from tests.support.fuse import mounted
from tests.support.waiting import wait_for

pytestmark = [
    pytest.mark.skipif(fuse_unavailable() is not None, reason=fuse_unavailable() or ""),
    pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root"),
]

needs_udev = pytest.mark.skipif(
    not any(os.access(p, os.X_OK) for p in ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd"))
    or shutil.which("udevadm") is None, reason="udev (systemd-udevd, udevadm) not installed")

MEM = "/sys/devices/system/memory"
ONLINE_RULE = 'SUBSYSTEM=="memory", ACTION=="add", ATTR{state}=="offline", ATTR{state}="online"\n'


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


class LineReader:
    """Collect a process's stdout lines in a thread (so reads are bounded by timeouts)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.q: queue.Queue = queue.Queue()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        for line in self.proc.stdout:
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def until(self, pred: Callable[[str], bool], timeout: float = 15.0) -> list[str]:
        got, deadline = [], time.monotonic() + timeout
        while True:
            try:
                line = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"timed out; got {got}") from None
            if line is None:
                raise AssertionError(f"process ended; got {got}")
            got.append(line)
            if pred(line):
                return got


def uevent_listeners(sb: Sandbox) -> list[str]:
    """NETLINK_KOBJECT_UEVENT sockets in the sandbox's network namespace that receive the
    kernel's multicast group (the forwarder's own socket joins none): the rows of
    /proc/net/netlink (net/netlink/af_netlink.c, netlink_seq_show) with Eth 15, Groups != 0."""
    rows = Path(f"/proc/{sb.holder}/net/netlink").read_text().splitlines()[1:]
    return [r for r in rows if r.split()[1] == "15" and int(r.split()[3], 16) != 0]


def hotplug_cycle(m) -> str:
    """plug (add), online, offline, unplug (remove) one 128M DIMM; returns its devpath."""
    r = m.plug("128M")
    b = r["blocks"][0]["id"]
    m.write(f"{MEM}/memory{b}/state", "online")
    m.write(f"{MEM}/memory{b}/state", "offline")
    m.unplug(r["device"]["id"])
    return f"/devices/system/memory/memory{b}"


# ---------------------------------------------------------------------- udevd

@needs_udev
def test_udevd_rule_onlines_hot_added_blocks(memfs_machine):
    m = memfs_machine
    m.udevd({"40-memory-online.rules": ONLINE_RULE})
    start = m.seqnum()
    r = m.plug("256M")
    blocks = [b["id"] for b in r["blocks"]]
    assert blocks == [42, 43] and all(b["state"] == "offline" for b in r["blocks"])
    wait_for(lambda: all(m.read(f"{MEM}/memory{b}/state") == "online\n" for b in blocks),
             what="udevd to online the new blocks")
    evs = [(e["action"], e["devpath"].rsplit("/", 1)[1]) for e in m.events(since=start)]
    assert sorted(evs[:2]) == [("add", "memory42"), ("add", "memory43")]
    assert sorted(evs[2:]) == [("online", "memory42"), ("online", "memory43")]
    # the boot DIMMs were added before udevd ran (no coldplug): still offline
    assert m.read(f"{MEM}/memory32/state") == "offline\n"


@needs_udev
def test_udevd_run_rule_sees_the_event_environment(memfs_machine, tmp_path):
    m = memfs_machine
    log = tmp_path / "run.log"
    script = tmp_path / "record.sh"
    script.write_text("#!/bin/sh\n"
                      f'echo "$ACTION $DEVPATH $SUBSYSTEM $SEQNUM $MEMFS_SEQNUM" >> {log}\n')
    script.chmod(0o755)
    m.udevd({"40-memory-online.rules": ONLINE_RULE,
             "90-record.rules": f'SUBSYSTEM=="memory", RUN+="{script}"\n'})
    start = m.seqnum()
    m.plug("128M")
    wait_for(lambda: len(lines_of(log)) >= 2, what="the RUN+= script for add and online")
    memfs_events = m.events(since=start)
    got = [line.split() for line in lines_of(log)]
    assert [g[:3] for g in got] == [["add", "/devices/system/memory/memory42", "memory"],
                                   ["online", "/devices/system/memory/memory42", "memory"]]
    # SEQNUM is the kernel's number for the injected event (increasing); memfs's own
    # SEQNUM travels as MEMFS_SEQNUM
    assert int(got[0][3]) < int(got[1][3])
    assert [int(g[4]) for g in got] == [e["seqnum"] for e in memfs_events]


# ---------------------------------------------------------------------- monitors

@needs_udev
def test_udevadm_monitor_kernel_receives_add_online_offline_remove(memfs_machine):
    m = memfs_machine
    p = m.sandbox.popen(["udevadm", "monitor", "--kernel", "--property", "--subsystem-match=memory"],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        rd = LineReader(p)
        rd.until(lambda line: line.startswith("KERNEL - the kernel uevent"))
        wait_for(lambda: uevent_listeners(m.sandbox), what="udevadm monitor to join the uevent group")
        devpath = hotplug_cycle(m)
        out = rd.until(lambda line: line.startswith("ACTION=remove"), timeout=15)
        out += rd.until(lambda line: line.startswith("SEQNUM="), timeout=5)
    finally:
        p.kill()
        p.wait(10)
    heads = [line.split()[1:3] for line in out if line.startswith("KERNEL[")]
    assert heads == [["add", devpath], ["online", devpath], ["offline", devpath], ["remove", devpath]]
    mseq = [int(line.split("=")[1]) for line in out if line.startswith("MEMFS_SEQNUM=")]
    kseq = [int(line.split("=")[1]) for line in out if line.startswith("SEQNUM=")]
    assert mseq == sorted(mseq) and len(mseq) == 4 and mseq[-1] - mseq[0] == 3
    assert kseq == sorted(kseq) and len(set(kseq)) == 4


PYUDEV_SCRIPT = r"""
import json, sys, pyudev
ctx = pyudev.Context()
mon = pyudev.Monitor.from_netlink(ctx, source="kernel")
mon.filter_by("memory")
mon.start()
print("READY", flush=True)
def attr(d, name):
    try:    # read from /sys: the memfs overlay in the sandbox (gone once the block is removed)
        return d.attributes.asstring(name)
    except (KeyError, OSError):
        return None
for _ in range(int(sys.argv[1])):
    d = mon.poll(timeout=20)
    if d is None:
        print("TIMEOUT", flush=True)
        break
    print(json.dumps({"action": d.action, "devpath": d.device_path, "subsystem": d.subsystem,
                      "seqnum": d.sequence_number, "memfs_seqnum": d.properties.get("MEMFS_SEQNUM"),
                      "phys_index": attr(d, "phys_index")}),
          flush=True)
"""


def test_pyudev_receives_add_online_offline_remove(memfs_machine, tmp_path):
    pytest.importorskip("pyudev")
    m = memfs_machine
    script = tmp_path / "pyudev_monitor.py"
    script.write_text(PYUDEV_SCRIPT)
    p = m.sandbox.popen([sys.executable, str(script), "4"], stdout=subprocess.PIPE, text=True)
    try:
        rd = LineReader(p)
        rd.until(lambda line: line == "READY")
        r = m.plug("128M")
        b = r["blocks"][0]["id"]
        devpath = f"/devices/system/memory/memory{b}"
        # the monitor reads phys_index when it gets "add": the block must still exist then
        out = rd.until(lambda line: '"add"' in line or line == "TIMEOUT", timeout=30)
        m.write(f"{MEM}/memory{b}/state", "online")
        m.write(f"{MEM}/memory{b}/state", "offline")
        m.unplug(r["device"]["id"])
        out += rd.until(lambda line: '"remove"' in line or line == "TIMEOUT", timeout=30)
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    got = [json.loads(line) for line in out]
    assert [(g["action"], g["devpath"], g["subsystem"]) for g in got] == [
        (a, devpath, "memory") for a in ("add", "online", "offline", "remove")]
    assert got[0]["phys_index"] == f"{int(devpath.rsplit('memory', 1)[1]):08x}"
    assert [int(g["memfs_seqnum"]) for g in got] == sorted(int(g["memfs_seqnum"]) for g in got)


def test_memfs_monitor_prints_events_as_they_happen(memfs_machine):
    m = memfs_machine
    start = m.seqnum()
    p = subprocess.Popen([sys.executable, "-m", "memfs", "monitor", str(m.path), "--json", "--count", "4",
                          "--since", str(start), "--timeout", "60"], stdout=subprocess.PIPE, text=True)
    try:
        devpath = hotplug_cycle(m)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert p.returncode == 0
    got = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [(g["action"], g["devpath"]) for g in got] == [
        (a, devpath) for a in ("add", "online", "offline", "remove")]
    assert [g["seqnum"] for g in got] == list(range(start + 1, start + 5))


# ---------------------------------------------------------------------- uevent helper

def test_uevent_helper_logs_every_event_in_order(tmp_path):
    log = tmp_path / "helper.log"
    helper = tmp_path / "helper.sh"
    # a slow helper: order must hold even when events come faster than it runs
    helper.write_text("#!/bin/sh\nsleep 0.05\n"
                      f'echo "$1 $ACTION $DEVPATH $SUBSYSTEM $SEQNUM $HOME $PATH" >> {log}\n')
    helper.chmod(0o755)
    with memfs_machine_cm({"uevent_helper": str(helper)}) as m:
        start = m.seqnum()
        devpath = hotplug_cycle(m)
        r = m.plug("256M")
        m.unplug(r["device"]["id"])
        expected = [e for e in m.events(since=start)]
        assert len(expected) == 8
        wait_for(lambda: len(lines_of(log)) >= 8, what="the helper to run for all 8 events")
        got = [line.split() for line in lines_of(log)]
    assert [g[:5] for g in got] == [["memory", e["action"], e["devpath"], "memory", str(e["seqnum"])]
                                    for e in expected]
    assert [g[1] for g in got[:4]] == ["add", "online", "offline", "remove"] and got[0][2] == devpath
    assert got[0][5:] == ["/", "/sbin:/bin:/usr/sbin:/usr/bin"]


# ---------------------------------------------------------------------- isolation and latency

def test_no_memfs_uevent_reaches_the_host_network_namespace(memfs_machine):
    m = memfs_machine
    host = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15)
    try:
        host.bind((0, 1))   # listen (only) in this, the host's, namespace
        hotplug_cycle(m)
        assert m.events(since=0)[-1]["action"] == "remove"
        leaked, deadline = [], time.monotonic() + 1.0
        while time.monotonic() < deadline:
            r, _, _ = select.select([host], [], [], max(0.0, deadline - time.monotonic()))
            if r:
                data = host.recv(65536)
                if b"MEMFS_SEQNUM=" in data or b"/devices/system/memory/memory4" in data:
                    leaked.append(data)
        assert leaked == []
    finally:
        host.close()


def test_delivery_latency(tmp_path):
    """emit -> kernel ack (forwarder) and emit -> received by libudev in the sandbox."""
    pyudev = pytest.importorskip("pyudev")

    machine = Machine.from_config()
    n = 100
    emitted: dict[int, float] = {}
    machine.events.subscribe(lambda ev: emitted.setdefault(ev.seqnum, time.monotonic()))
    with mounted(build_tree(machine), tmp_path, mode="thread") as mnt:
        att = MachineSandbox(machine, os.fspath(mnt.path))
        try:
            with att.sandbox.in_netns():
                mon = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
            mon.filter_by("memory")
            mon.start()
            state = os.path.join(mnt.path, "sys/devices/system/memory/memory32/state")
            e2e = []
            for i in range(n):
                with open(state, "w") as f:
                    f.write("online" if i % 2 == 0 else "offline")
                d = mon.poll(timeout=10)
                assert d is not None and d.action == ("online" if i % 2 == 0 else "offline")
                e2e.append(time.monotonic() - emitted[int(d.properties["MEMFS_SEQNUM"])])
            assert att.flush(10)
            ack = list(att.forwarder.stats.latencies)
            assert att.forwarder.stats.failed == 0 and att.forwarder.stats.sent == n
        finally:
            att.close()

    def summary(xs: list[float]) -> dict:
        xs = sorted(xs)
        return {"median_ms": round(statistics.median(xs) * 1e3, 3),
                "p99_ms": round(xs[int(len(xs) * 0.99) - 1] * 1e3, 3), "max_ms": round(xs[-1] * 1e3, 3)}

    result = {"events": n, "emit_to_kernel_ack": summary(ack), "emit_to_libudev": summary(e2e)}
    print("uevent delivery latency:", json.dumps(result))
    assert result["emit_to_libudev"]["median_ms"] < 100


@needs_udev
def test_memfs_udevd_command(memfs_machine, tmp_path):
    m, mnt = memfs_machine, str(memfs_machine.path)
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "40-memory-online.rules").write_text(ONLINE_RULE)
    (rules / "README").write_text("not a rules file: ignored\n")

    def memfs(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "memfs", *args], capture_output=True, text=True,
                              timeout=60)

    r = memfs("udevd", mnt, "--rules", str(rules), "--log", str(tmp_path / "udevd.log"))
    assert r.returncode == 0 and "udevd running in the sandbox" in r.stdout, r.stderr
    try:
        pid = r.stdout.split("(pid ")[1].split()[0]
        # udevd's own mount namespace: only our rules, copied; the distribution's hidden
        r = memfs("exec", mnt, "--", "ls", f"/proc/{pid}/root/etc/udev/rules.d",
                  f"/proc/{pid}/root/usr/lib/udev/rules.d")
        assert r.stdout.split() == [f"/proc/{pid}/root/etc/udev/rules.d:", "40-memory-online.rules",
                                    f"/proc/{pid}/root/usr/lib/udev/rules.d:"], r.stderr
        r = memfs("plug", mnt, "--size", "128M")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: m.read(f"{MEM}/memory42/state") == "online\n", what="udevd to online memory42")
        r = memfs("exec", mnt, "--", "udevadm", "info", "--query=property", f"{MEM}/memory42")
        assert "SUBSYSTEM=memory" in r.stdout and "DEVPATH=/devices/system/memory/memory42" in r.stdout
    finally:
        r = memfs("udevd", mnt, "--stop")
    assert r.returncode == 0 and "udevd stopped" in r.stdout, r.stderr
    r = memfs("exec", mnt, "--", "udevadm", "control", "--ping", "--timeout=1")
    assert r.returncode != 0
