"""Load: many processes doing random reads, state/online writes, plugs, unplugs, allocations
and frees at once, through the mount and the control socket, finish before a deadline with
the accounting identities intact all along; the journal of the state file replayed on a
fresh model gives the final machine exactly (blocks, zones, allocations, devices, seqnum,
and the digest of everything). $MEMFS_LOAD_PROCS x $MEMFS_LOAD_OPS operations (default
8 x 2000), deadline $MEMFS_LOAD_DEADLINE seconds (default 150)."""
from __future__ import annotations

import errno
import multiprocessing
import os
import random
import threading
import time
from pathlib import Path

import pytest

from memfs import control, persist
from memfs.machine.config import load_config
from memfs.status import snapshot
from tests.support.reliability import count, daemon, env_int, invariants, log_problems

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, allow_other, /run/memfs)"),
              pytest.mark.usefixtures("reliability_figures")]

MEM = "sys/devices/system/memory"
READS = ["state", "online", "valid_zones", "phys_index", "removable"]
GLOBAL_READS = ["proc/meminfo", "proc/zoneinfo", "proc/vmstat", f"{MEM}/auto_online_blocks",
                "sys/devices/system/node/node0/meminfo", f"{MEM}/block_size_bytes"]
#: errnos that are answers, not failures: the model refusing (busy, gone, invalid, full)
MODEL_ERRNOS = {errno.EINVAL, errno.EBUSY, errno.ENODEV, errno.ENOENT, errno.ENOSPC, errno.ENOMEM, errno.EEXIST,
                errno.EPERM, errno.E2BIG, 133}




def worker(mnt: str, seed: int, n: int, deadline: float, out: "multiprocessing.Queue") -> None:
    rng = random.Random(seed)
    mem = Path(mnt) / MEM
    done = {"read": 0, "write": 0, "control": 0, "refused": 0}
    bad: list[str] = []
    blocks: list[int] = []
    client = None
    try:
        client = control.ControlClient(mnt, timeout=60)
        for i in range(n):
            if time.monotonic() > deadline:
                bad.append(f"deadline passed after {i} operations")
                break
            if i % 50 == 0 or not blocks:
                blocks = sorted(int(x[6:]) for x in os.listdir(mem) if x.startswith("memory"))
            r = rng.random()
            try:
                if r < 0.45:
                    if rng.random() < 0.7:
                        p = mem / f"memory{rng.choice(blocks)}/{rng.choice(READS)}"
                    else:
                        p = Path(mnt) / rng.choice(GLOBAL_READS)
                    p.read_bytes()
                    done["read"] += 1
                elif r < 0.8:
                    b = rng.choice(blocks)
                    if rng.random() < 0.6:
                        p, v = mem / f"memory{b}/state", rng.choice([b"online", b"offline", b"online_movable",
                                                                    b"online_kernel"])
                    else:
                        p, v = mem / f"memory{b}/online", rng.choice([b"0", b"1"])
                    fd = os.open(p, os.O_WRONLY)
                    try:
                        os.write(fd, v)
                    finally:
                        os.close(fd)
                    done["write"] += 1
                else:
                    op = rng.random()
                    if op < 0.3:
                        client.call("plug", size=rng.choice(["128M", "256M", "512M"]),
                                    driver=rng.choice(["acpi", "virtio_mem", "dax_kmem"]))
                    elif op < 0.55:
                        devs = [d["id"] for d in client.call("status")["status"]["devices"]]
                        if devs:
                            client.call("unplug", id=rng.choice(devs))
                    elif op < 0.8:
                        client.call("alloc", kind=rng.choice(["movable", "unmovable"]),
                                    size=rng.randrange(4096, 64 << 20))
                    else:
                        allocs = [a["id"] for a in client.call("status")["status"]["allocations"]
                                  if a["label"] == "user"]
                        if allocs:
                            client.call("free", id=rng.choice(allocs))
                    done["control"] += 1
            except control.ControlError as e:
                if e.errno in MODEL_ERRNOS:
                    done["refused"] += 1
                else:
                    bad.append(f"control: {e.errno} {e.message}")
            except OSError as e:
                if e.errno in MODEL_ERRNOS:
                    done["refused"] += 1
                else:
                    bad.append(f"{e.filename}: {errno.errorcode.get(e.errno, e.errno)}")
            if len(bad) > 20:
                break
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        bad.append(f"worker crashed: {type(e).__name__}: {e}")
    finally:
        if client is not None:
            client.close()
        out.put((seed, done, bad))


def test_load_keeps_invariants_and_the_journal_reproduces_the_machine():
    procs = env_int("MEMFS_LOAD_PROCS", 8)
    ops = env_int("MEMFS_LOAD_OPS", 2000)
    limit = env_int("MEMFS_LOAD_DEADLINE", 150)
    with daemon(mount=False, env={"MEMFS_STATE_COMPACT_EVERY": "0"}) as d:
        statefile = d.base / "machine.state"
        d.args = ["--no-sandbox", "--set", "boot.memhp_default_state=online", "--state", str(statefile)]
        d.mount()
        t0 = time.monotonic()
        deadline = t0 + limit
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        ps = [ctx.Process(target=worker, args=(str(d.path), 1000 + i, ops, deadline, q), daemon=True)
              for i in range(procs)]
        violations: list[str] = []
        checks = 0
        stop = threading.Event()

        def checker() -> None:
            nonlocal checks
            with control.ControlClient(d.path, timeout=60) as c:
                while not stop.wait(0.3):
                    bad = invariants(c.call("status")["status"])
                    checks += 1
                    if bad:
                        violations.extend(bad)
                        return
        th = threading.Thread(target=checker, daemon=True)
        for p in ps:
            p.start()
        th.start()
        results = []
        try:
            for _ in ps:
                results.append(q.get(timeout=max(1.0, deadline + 30 - time.monotonic())))
        finally:
            stop.set()
            for p in ps:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join(5)
        th.join(30)
        elapsed = time.monotonic() - t0
        bad = [b for _, _, bs in results for b in bs]
        assert not bad, bad[:10]
        assert elapsed < limit, f"{procs} x {ops} operations took {elapsed:.0f} s"
        assert not violations, violations[:5]
        assert checks >= 3
        total = {k: sum(r[1][k] for r in results) for k in ("read", "write", "control", "refused")}
        assert sum(total.values()) == procs * ops, total  # every operation answered

        # quiescent: the mount shows what status says
        s = d.status()
        assert not invariants(s)
        mi = dict(line.split(":", 1) for line in (d.path / "proc/meminfo").read_text().splitlines())
        assert int(mi["MemTotal"].split()[0]) == s["meminfo"]["MemTotal"]
        for b in s["blocks"]:
            assert (d.memory / f"memory{b['id']}/state").read_text() == b["state"] + "\n"

        # the journal, replayed on a fresh model, is this machine
        header, entries = persist.read_journal(str(statefile))
        assert header["ops"] == 0 and header["checkpoint"] is None
        cfg = load_config(None, overrides={"boot.memhp_default_state": "online"})
        fresh, mismatches = persist.replay_fresh(entries, cfg)
        assert mismatches == 0
        mine = snapshot(fresh)
        for key in ("blocks", "nodes", "allocations", "devices", "seqnum", "meminfo", "hotplug",
                    "auto_online_blocks", "generation"):
            assert mine[key] == s[key], key
        assert persist.digest(fresh) == d.digest()
        assert not log_problems(d.log()), log_problems(d.log())[:5]
        count("load operations done", sum(total.values()))
        count("load changes journaled and replayed", len(entries))
        count("load invariant checks", checks)
        print(f"\nload: {procs} x {ops} in {elapsed:.1f} s: {total}; {len(entries)} journaled; {checks} checks")
