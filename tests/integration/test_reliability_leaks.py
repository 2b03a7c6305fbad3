"""No leaks: the daemon's RSS and open descriptors after $MEMFS_LEAK_OPS operations (default
100,000) are within a few percent of what they were after the first tenth (10,000).

Operations are model-level requests through the control socket, pipelined in batches
(plug/unplug of every driver, alloc/free, events, ping, status), while a thread opens,
reads and writes files through the mount. The warm-up fills what is bounded by design
(the last 100,000 uevents the daemon keeps for ``memfs events``, the last 10,000 ACPI
_OST reports) before the first measurement, so what is measured is growth that has no bound.
"""
from __future__ import annotations

import errno
import json
import os
import random
import socket
import threading
import time

import psutil
import pytest

from tests.support.reliability import count, daemon, env_int, invariants, log_problems

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, allow_other, /run/memfs)"),
              pytest.mark.usefixtures("reliability_figures")]

MEM = "sys/devices/system/memory"




class Pipe:
    """Batches of requests on one control connection: send them all, then read the replies."""

    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(120)
        self.s.connect(path)
        self.rf = self.s.makefile("rb")
        self.sent = 0

    def batch(self, reqs: list[dict]) -> list[dict]:
        self.s.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in reqs))
        out = []
        for _ in reqs:
            line = self.rf.readline()
            assert line, "the daemon closed the control connection"
            out.append(json.loads(line))
        self.sent += len(reqs)
        return out

    def close(self) -> None:
        self.rf.close()
        self.s.close()


def requests(rng: random.Random, n: int, big: str = "") -> list[dict]:
    """n requests whose effects cancel out over time (what is plugged gets unplugged...)."""
    out: list[dict] = []
    while len(out) < n:
        r = rng.random()
        if big or r < 0.25:
            drv = big or rng.choice(["acpi", "virtio_mem", "dax_kmem", "probe"])
            size = {"dax_kmem": "8G", "acpi": "128M"}[big] if big else rng.choice(["128M", "1G"])
            dev = f"leak-{rng.randrange(1 << 30)}"
            out += [{"op": "plug", "size": size, "driver": drv, "id": dev}, {"op": "unplug", "id": dev}]
        elif r < 0.55:
            out += [{"op": "alloc", "kind": rng.choice(["movable", "unmovable"]), "size": rng.randrange(4096, 8 << 20)},
                    {"op": "free", "id": -1}]  # the id is filled in from the alloc's reply
        elif r < 0.552:  # (few: events scans the whole history it keeps, O(100,000) each)
            out.append({"op": "events", "since": 10**9})
        elif r < 0.995:
            out.append({"op": "ping"})
        else:
            out.append({"op": "status"})
    return out


def run_batches(p: Pipe, rng: random.Random, n: int, big: str = "") -> int:
    done = 0
    while done < n:
        reqs = requests(rng, min(200, n - done), big)
        # an alloc and its free go in separate batches: the free needs the alloc's id
        allocs = [r for r in reqs if r["op"] != "free"]
        replies = p.batch(allocs)
        frees = [{"op": "free", "id": r["allocation"]["id"]} for r in replies if r.get("ok") and "allocation" in r]
        if frees:
            replies += p.batch(frees)
        for q, r in zip(allocs + frees, replies):
            assert r["ok"] or r["errno"] in (errno.ENOSPC, errno.EBUSY, errno.ENOMEM, errno.ENOENT, errno.EINVAL,
                                             errno.EEXIST), (q, r)
        done += len(allocs) + len(frees)
    return done


def measure(proc: psutil.Process) -> tuple[int, int]:
    return proc.memory_info().rss, proc.num_fds()


def test_rss_and_descriptors_stay_flat():
    total = env_int("MEMFS_LEAK_OPS", 100_000)
    first = total // 10
    rng = random.Random(7)
    with daemon("--no-sandbox") as d:
        proc = psutil.Process(d.pid)
        p = Pipe(d.status()["control_socket"])
        stop = threading.Event()
        fuse_ops = [0]
        fuse_errors: list[str] = []

        def fuse_worker() -> None:
            r = random.Random(8)
            while not stop.is_set():
                b = r.choice([0, 1, 32, 33, 34, 35])
                try:
                    for name in ("state", "online", "valid_zones"):
                        (d.memory / f"memory{b}/{name}").read_bytes()
                    (d.path / "proc/meminfo").read_bytes()
                    fd = os.open(d.memory / f"memory{r.choice([36, 37])}/online", os.O_WRONLY)
                    try:
                        os.write(fd, r.choice([b"0", b"1"]))
                    except OSError as e:
                        if e.errno not in (errno.EBUSY, errno.EINVAL):
                            raise
                    finally:
                        os.close(fd)
                    fuse_ops[0] += 5
                except OSError as e:
                    if e.errno not in (errno.ENOENT, errno.ENODEV):
                        fuse_errors.append(repr(e))
                        return
        th = threading.Thread(target=fuse_worker, daemon=True)
        th.start()
        t0 = time.monotonic()
        try:
            # warm-up: fill the 100,000-event history and the 10,000 ACPI _OST reports (3 per
            # DIMM plugged and ejected), then the first tenth of the operations
            while d.call("events", since=10**9)["seqnum"] < 110_000:
                # dax/kmem adds all 64 blocks of 8G at once (virtio-mem would stop at its 1 GiB
                # offline threshold, 8 blocks: 8 times the batches for the same events)
                run_batches(p, rng, 200, big="dax_kmem")
            run_batches(p, rng, 7000, big="acpi")
            run_batches(p, rng, first)
            ops_a = p.sent + fuse_ops[0]
            rss_a, fds_a = measure(proc)
            run_batches(p, rng, total - first)
            ops_b = p.sent + fuse_ops[0]
            rss_b, fds_b = measure(proc)
        finally:
            stop.set()
            th.join(30)
            p.close()
        elapsed = time.monotonic() - t0
        assert not fuse_errors, fuse_errors
        growth = (rss_b - rss_a) / rss_a
        print(f"\nleaks: {ops_a} operations: RSS {rss_a >> 10} KiB, {fds_a} fds; {ops_b} operations: "
              f"RSS {rss_b >> 10} KiB ({growth:+.1%}), {fds_b} fds; {elapsed:.0f} s")
        assert fds_b <= fds_a, (fds_a, fds_b)
        assert rss_b <= rss_a * 1.05 + (1 << 20), (rss_a, rss_b)  # a few percent (and 1 MiB of slack)
        assert not invariants(d.status())
        assert not log_problems(d.log()), log_problems(d.log())[:5]
        count("leak-test operations", ops_b)
