"""``python -m bench`` (``./scripts/bench``): memfs beside its binding's floor, tmpfs and /sys.

Every figure comes from this one run, so every ratio compares like with like:

1. attribute access: open+read+close of ``memoryN/state`` and ``valid_zones``
   (median of many) on memfs (with FUSE_NOTIFY_INC_EPOCH where the kernel has it,
   and without: the path of kernels before 6.16), on a minimal filesystem of the
   same binding, design and mount options serving one constant file at the same
   path, on a static copy of the same tree on tmpfs, and on this machine's real
   /sys (read only);
2. writes: ``online``/``offline`` stores through the mount, on a small machine and
   on 65,536 blocks (a change must cost the same whatever the machine's size);
3. ``lsmem --sysroot`` (and ``lsmem -a``) over memfs and over its tmpfs copy;
4. the model alone: ``Machine.state_store`` online+offline pairs;
5. mount time (until the first stat of ``block_size_bytes``) and daemon RSS,
   before and after a burst of operations;
6. four concurrent readers against one: aggregate operations per second.

Safety: mounts only under a fresh directory in /tmp, copies only into a fresh
directory in /dev/shm (or /tmp), never writes to /sys or /proc, unmounts and
removes everything it made, signals only the daemons it started, and bounds
every wait.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from bench.machines import bench_machine, target_block
from memfs.fuse import kernel_has_epoch

ROOT = str(Path(__file__).resolve().parents[1])  # `python -m bench.servers` runs from here
MEMDIR = "sys/devices/system/memory"
READY_FILE = f"{MEMDIR}/block_size_bytes"
REAL_SYS = "/sys/devices/system/memory/memory0"


# ---------------------------------------------------------------------- plans

FULL = {
    "attr_blocks": 64, "attr_ops": 2000, "write_ops": 500, "write_blocks": [64, 65536],
    "lsmem_blocks": [1024, 8192], "lsmem_runs": 3,
    "model_blocks": [64, 4096, 65536], "model_pairs": 2000,
    "mount_blocks": [64, 8192, 65536], "rss_ops": 20000,
    "conc_seconds": 2.0, "readers": 4,
}
QUICK = {
    "attr_blocks": 16, "attr_ops": 100, "write_ops": 20, "write_blocks": [16, 256],
    "lsmem_blocks": [16, 64], "lsmem_runs": 1,
    "model_blocks": [16, 256], "model_pairs": 100,
    "mount_blocks": [16, 256], "rss_ops": 200,
    "conc_seconds": 0.3, "readers": 4,
}


# ---------------------------------------------------------------------- helpers

def _median_us(samples: list[int]) -> float:
    return round(statistics.median(samples) / 1000, 2)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


def read_once(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def time_reads(path: str, n: int) -> float:
    """Median microseconds of open+read(4096)+close of ``path``."""
    read_once(path)  # warm: first access may build lazy tables
    samples = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t = clock()
        fd = os.open(path, os.O_RDONLY)
        os.read(fd, 4096)
        os.close(fd)
        samples.append(clock() - t)
    return _median_us(samples)


def time_store(path: str, text: bytes) -> int:
    t = time.perf_counter_ns()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text)
    finally:
        os.close(fd)
    return time.perf_counter_ns() - t


def _unmount(path: str) -> None:
    if _is_mountpoint(path):
        subprocess.run(["fusermount", "-u", "-z", path], capture_output=True, timeout=20, check=False)


def _is_mountpoint(path: str) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f if len(line.split()) > 1)


class Daemon:
    """One benchmark daemon (memfs or the minimal fs) mounted under ``workdir``."""

    def __init__(self, workdir: str, name: str, args: list[str], ready_rel: str,
                 timeout: float = 60.0) -> None:
        self.mnt = os.path.join(workdir, name)
        os.makedirs(self.mnt, exist_ok=True)
        self.log_path = os.path.join(workdir, name + ".log")
        self.ready_rel = ready_rel
        self.timeout = timeout
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None

    def start(self) -> "Daemon":
        cmd = [sys.executable, "-m", "bench.servers", *self.args[:1], self.mnt, *self.args[1:]]
        ready = os.path.join(self.mnt, self.ready_rel)
        with open(self.log_path, "ab") as log:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT)
        deadline = t0 + self.timeout
        while True:
            try:
                os.stat(ready)
                break
            except OSError:
                pass
            if self.proc.poll() is not None or time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"bench daemon {' '.join(cmd)} did not mount: "
                                   f"{Path(self.log_path).read_text(errors='replace')[-2000:]}")
            time.sleep(0.002)
        self.ready_s = round(time.perf_counter() - t0, 3)
        return self

    def rss_mib(self) -> float | None:
        try:
            import psutil
        except ImportError:  # pragma: no cover
            return None
        assert self.proc is not None
        return round(psutil.Process(self.proc.pid).memory_info().rss / (1 << 20), 1)

    def path(self, rel: str) -> str:
        return os.path.join(self.mnt, rel)

    def stop(self) -> None:
        _unmount(self.mnt)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.terminate()  # our own child, by pid
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        _unmount(self.mnt)

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def memfs_daemon(workdir: str, blocks: int, name: str | None = None, epoch: bool = True,
                 page_cache: bool = True) -> Daemon:
    args = ["memfs", "--blocks", str(blocks)]
    if not epoch:
        args.append("--no-inc-epoch")
    if not page_cache:
        args.append("--direct")
    return Daemon(workdir, name or f"memfs-{blocks}", args, READY_FILE)


def minimal_daemon(workdir: str, rel: str, text: str, name: str) -> Daemon:
    return Daemon(workdir, name, ["minimal", "--file", rel, "--text", text], rel)


# ---------------------------------------------------------------------- static copy

def static_copy(blocks: int, dest: str) -> int:
    """Write the tree of a bench machine of ``blocks`` blocks under ``dest``; returns #files."""
    from memfs.sysfs.kernfs import Attr, DirNode, Link
    from memfs.sysfs.tree import build_tree

    tree = build_tree(bench_machine(blocks))
    count = 0

    def walk(node: Any, path: str) -> None:
        nonlocal count
        for name, child in node.entries():
            p = os.path.join(path, name)
            if isinstance(child, DirNode):
                os.mkdir(p)
                walk(child, p)
            elif isinstance(child, Link):
                os.symlink(child.target, p)
            elif isinstance(child, Attr):
                data = b""
                if child.readable:
                    try:
                        text = child.show()  # type: ignore[misc]
                        data = text.encode() if isinstance(text, str) else text
                    except OSError:
                        pass
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                os.chmod(p, child.mode)
            count += 1

    os.makedirs(dest, exist_ok=True)
    walk(tree.root, dest)
    return count


# ---------------------------------------------------------------------- sections

def _variants() -> list[tuple[str, bool, bool]]:
    """(column suffix, INC_EPOCH, page cache): the fast path (`memfs mount --page-cache`),
    on 6.16+ also as it runs on older kernels (entries dropped one by one), and the
    daemon's default (texts served directly, OPEN per access)."""
    out = [("", True, True)]
    if kernel_has_epoch():
        out.append(("_noepoch", False, True))
    return out + [("_direct", True, False)]


def bench_attr(work: str, shm: str, plan: dict) -> dict:
    n = plan["attr_blocks"]
    m = bench_machine(n)
    bid = target_block(m)
    rels = {"state": f"{MEMDIR}/memory{bid}/state", "valid_zones": f"{MEMDIR}/memory{bid}/valid_zones"}
    ops = plan["attr_ops"]
    static = os.path.join(shm, f"static-{n}")
    static_copy(n, static)
    out: dict[str, Any] = {"blocks": n, "block": bid, "ops": ops, "inc_epoch": kernel_has_epoch(),
                           "read": "open + read(4096) + close, full path from the mount root"}
    rows: dict[str, dict[str, Any]] = {a: {} for a in rels}
    texts: dict[str, str] = {}
    for suffix, epoch, pc in _variants():
        with memfs_daemon(work, n, name=f"memfs{suffix}-{n}", epoch=epoch, page_cache=pc) as d:
            for attr, rel in rels.items():
                texts[attr] = Path(d.path(rel)).read_text()
                rows[attr][f"memfs{suffix}_us"] = time_reads(d.path(rel), ops)
    for attr, rel in rels.items():
        with minimal_daemon(work, rel, texts[attr], f"minimal-{attr}") as mn:
            rows[attr]["minimal_us"] = time_reads(mn.path(rel), ops)
    for attr, rel in rels.items():
        row = rows[attr]
        row["tmpfs_us"] = time_reads(os.path.join(static, rel), ops)
        real = os.path.join(REAL_SYS, attr)
        row["sysfs_us"] = time_reads(real, ops) if os.path.exists(real) else None
        for suffix, _, _ in _variants():
            row[f"memfs{suffix}_over_minimal"] = _ratio(row[f"memfs{suffix}_us"], row["minimal_us"])
            row[f"memfs{suffix}_over_tmpfs"] = _ratio(row[f"memfs{suffix}_us"], row["tmpfs_us"])
            row[f"memfs{suffix}_over_sysfs"] = _ratio(row[f"memfs{suffix}_us"], row["sysfs_us"])
        row["minimal_over_sysfs"] = _ratio(row["minimal_us"], row["sysfs_us"])
        out[attr] = row
    return out


def bench_writes(work: str, plan: dict) -> dict:
    """online+offline pairs through the mount, on each machine size of the plan."""
    rows = []
    for n in plan["write_blocks"]:
        rel = f"{MEMDIR}/memory{n - 1}/state"  # the DIMM's block is the last one (bench.machines)
        on: list[int] = []
        off: list[int] = []
        with memfs_daemon(work, n, name=f"memfs-w{n}") as d:
            p = d.path(rel)
            for _ in range(plan["write_ops"]):
                on.append(time_store(p, b"online"))
                off.append(time_store(p, b"offline"))
            final = Path(p).read_text().strip()
        row: dict[str, Any] = {"blocks": n, "online_us": _median_us(on), "offline_us": _median_us(off),
                               "final_state": final}
        row["pair_us"] = round(row["online_us"] + row["offline_us"], 2)
        rows.append(row)
    for r in rows:
        r["over_smallest"] = _ratio(r["pair_us"], rows[0]["pair_us"])
    first = rows[0]
    return {"pairs": plan["write_ops"], "sizes": rows, "online_us": first["online_us"],
            "offline_us": first["offline_us"], "pair_us": first["pair_us"], "final_state": first["final_state"]}


def _run_lsmem(args: list[str], timeout: float = 600) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(["lsmem", *args], capture_output=True, text=True, timeout=timeout)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"lsmem {' '.join(args)}: {r.stderr.strip()}")
    return dt, r.stdout


def bench_lsmem(work: str, shm: str, plan: dict) -> dict:
    if shutil.which("lsmem") is None:
        return {"skipped": "lsmem not installed"}
    rows = []
    for n in plan["lsmem_blocks"]:
        static = os.path.join(shm, f"lsmem-{n}")
        t = time.perf_counter()
        files = static_copy(n, static)
        copy_s = time.perf_counter() - t
        row: dict[str, Any] = {"blocks": n, "static_files": files, "static_copy_s": round(copy_s, 2)}
        outputs: dict[str, str] = {}
        for key, extra in (("lsmem", []), ("lsmem_a", ["-a"])):
            st, so = [], ""
            for _ in range(plan["lsmem_runs"]):
                dt, so = _run_lsmem([*extra, "--sysroot", static])
                st.append(dt)
            row[key] = {"tmpfs_s": round(statistics.median(st), 4)}
            outputs[key] = so
        with memfs_daemon(work, n, name=f"memfs-l{n}") as d:
            for key, extra in (("lsmem", []), ("lsmem_a", ["-a"])):
                r = row[key]
                # the first run after mounting fills the kernel's caches; the median is over warm runs
                t = time.perf_counter()
                _, mo = _run_lsmem([*extra, "--sysroot", d.mnt])
                r["memfs_cold_s"] = round(time.perf_counter() - t, 4)
                mt = []
                for _ in range(plan["lsmem_runs"]):
                    dt, mo = _run_lsmem([*extra, "--sysroot", d.mnt])
                    mt.append(dt)
                r["memfs_s"] = round(statistics.median(mt), 4)
                r["same_output"] = mo == outputs[key]
                r["lines"] = mo.count("\n")
                r["memfs_over_tmpfs"] = _ratio(r["memfs_s"], r["tmpfs_s"])
                r["memfs_cold_over_tmpfs"] = _ratio(r["memfs_cold_s"], r["tmpfs_s"])
        shutil.rmtree(static, ignore_errors=True)
        rows.append(row)
    return {"runs": plan["lsmem_runs"], "sizes": rows}


def bench_model(plan: dict) -> dict:
    rows = []
    for n in plan["model_blocks"]:
        t = time.perf_counter()
        m = bench_machine(n)
        boot_s = time.perf_counter() - t
        bid = target_block(m)
        samples = []
        clock = time.perf_counter_ns
        m.state_store(bid, 1)
        m.state_store(bid, 0)
        for _ in range(plan["model_pairs"]):
            t0 = clock()
            m.state_store(bid, 1)
            m.state_store(bid, 0)
            samples.append(clock() - t0)
        rows.append({"blocks": n, "boot_s": round(boot_s, 3), "pair_us": _median_us(samples)})
    base = rows[0]["pair_us"]
    for r in rows:
        r["over_smallest"] = _ratio(r["pair_us"], base)
    return {"pairs": plan["model_pairs"], "sizes": rows}


def bench_mount(work: str, plan: dict) -> dict:
    rows = []
    for n in plan["mount_blocks"]:
        with memfs_daemon(work, n, name=f"memfs-m{n}") as d:
            rss0 = d.rss_mib()
            bid = n - 1
            st = d.path(f"{MEMDIR}/memory{bid}/state")
            vz = d.path(f"{MEMDIR}/memory{bid}/valid_zones")
            half = plan["rss_ops"] // 2
            for i in range(half):
                read_once(st if i & 1 else vz)
            rss1 = d.rss_mib()
            for i in range(half):
                read_once(st if i & 1 else vz)
            rss2 = d.rss_mib()
            rows.append({"blocks": n, "ready_s": d.ready_s, "rss_mib": rss0,
                         "rss_after_half_mib": rss1, "rss_after_all_mib": rss2,
                         "ops": plan["rss_ops"]})
    return {"sizes": rows}


def _reader(path: str, start: float, stop: float, q: Any) -> None:
    while time.time() < start:
        time.sleep(0.0005)
    n = 0
    while time.time() < stop:
        fd = os.open(path, os.O_RDONLY)
        os.read(fd, 4096)
        os.close(fd)
        n += 1
    q.put(n)


def _parallel_rate(path: str, readers: int, seconds: float) -> float:
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    start = time.time() + 0.2
    stop = start + seconds
    procs = [ctx.Process(target=_reader, args=(path, start, stop, q), daemon=True)
             for _ in range(readers)]
    for p in procs:
        p.start()
    total = sum(q.get(timeout=seconds + 30) for _ in procs)
    for p in procs:
        p.join(10)
    return round(total / seconds, 1)


def bench_concurrency(work: str, plan: dict) -> dict:
    n = plan["attr_blocks"]
    bid = target_block(bench_machine(n))
    rel = f"{MEMDIR}/memory{bid}/state"
    k = plan["readers"]
    with memfs_daemon(work, n, name=f"memfs-c{n}") as d:
        one = _parallel_rate(d.path(rel), 1, plan["conc_seconds"])
        many = _parallel_rate(d.path(rel), k, plan["conc_seconds"])
    return {"readers": k, "seconds": plan["conc_seconds"], "one_ops_s": one,
            "many_ops_s": many, "many_over_one": _ratio(many, one)}


# ---------------------------------------------------------------------- report

def machine_info() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("fusepy", "psutil"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version
            versions[dist] = version(dist)
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "packages": versions}


def _lsmem_largest(r: dict) -> dict:
    return max(r["lsmem"]["sizes"], key=lambda x: x["blocks"])


#: issue 9's targets, as ratios within one run (never an absolute time)
TARGETS = {
    "attr_within_2x_of_sysfs": ("attr", lambda r: all(
        (r["attr"][a]["memfs_over_sysfs"] or 99) <= 2 for a in ("state", "valid_zones"))),
    "attr_noepoch_within_2x_of_sysfs": ("attr", lambda r: all(
        (r["attr"][a].get("memfs_noepoch_over_sysfs", r["attr"][a]["memfs_over_sysfs"]) or 99) <= 2
        for a in ("state", "valid_zones"))),
    "lsmem_a_within_3x_of_tmpfs": ("lsmem", lambda r: (_lsmem_largest(r)["lsmem_a"]["memfs_over_tmpfs"] or 999) <= 3),
    "writes_flat_within_1.3x": ("writes", lambda r: r["writes"]["sizes"][-1]["over_smallest"] <= 1.3),
    "model_flat_within_1.3x": ("model", lambda r: r["model"]["sizes"][-1]["over_smallest"] <= 1.3),
    "mount_under_3s": ("mount", lambda r: r["mount"]["sizes"][-1]["ready_s"] < 3),
    "rss_under_200MiB": ("mount", lambda r: r["mount"]["sizes"][-1]["rss_after_all_mib"] < 200),
}


def targets(res: dict) -> dict:
    out = {}
    for name, (section, check) in TARGETS.items():
        if section not in res or "skipped" in res[section]:
            continue
        try:
            out[name] = bool(check(res))
        except (KeyError, IndexError, TypeError, ValueError):
            out[name] = None
    return out


def _f(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.2f}{unit}" if x < 100 else f"{x:,.0f}{unit}"
    return f"{x}{unit}"


def format_table(res: dict) -> str:
    lines: list[str] = []
    info = res["machine"]
    lines.append(f"memfs bench {res['date']}  ({'quick' if res['quick'] else 'full'}; fusepy "
                 f"{info['packages'].get('fusepy', '?')}; {info['nproc']} CPU {info['cpu']}; "
                 f"kernel {info['kernel']})")
    if "attr" in res:
        a = res["attr"]
        ne = "memfs_noepoch_us" in a["state"]
        lines.append("")
        lines.append(f"1. attribute access, us per open+read+close (median of {a['ops']}; "
                     f"memory{a['block']} of {a['blocks']} blocks; memfs: `memfs mount`'s fast path"
                     + ("; -epoch: without FUSE_NOTIFY_INC_EPOCH, as on kernels < 6.16" if ne else "")
                     + "; min: one-file fusepy fs, same design and options)")
        head = f"   {'file':<12} {'memfs':>7}" + (f" {'-epoch':>7}" if ne else "")
        head += f" {'min':>7} {'tmpfs':>6} {'sysfs':>6} | {'memfs/min':>9} {'memfs/tmpfs':>11} {'memfs/sysfs':>11}"
        head += f" {'-epoch/sysfs':>12}" if ne else ""
        lines.append(head)
        for attr in ("state", "valid_zones"):
            r = a[attr]
            line = f"   {attr:<12} {_f(r['memfs_us']):>7}" + (f" {_f(r['memfs_noepoch_us']):>7}" if ne else "")
            line += (f" {_f(r['minimal_us']):>7} {_f(r['tmpfs_us']):>6} {_f(r['sysfs_us']):>6} | "
                     f"{_f(r['memfs_over_minimal'], 'x'):>9} {_f(r['memfs_over_tmpfs'], 'x'):>11} "
                     f"{_f(r['memfs_over_sysfs'], 'x'):>11}")
            line += f" {_f(r['memfs_noepoch_over_sysfs'], 'x'):>12}" if ne else ""
            line += f" | default {_f(r['memfs_direct_us'])} us = {_f(r['memfs_direct_over_sysfs'], 'x')} sysfs"
            lines.append(line)
    if "writes" in res:
        w = res["writes"]
        lines.append("")
        lines.append(f"2. writes through the mount, us per open+write+close (median of {w['pairs']})")
        for r in w["sizes"]:
            lines.append(f"   {r['blocks']:>7} blocks: online {_f(r['online_us'])}   offline {_f(r['offline_us'])}   "
                         f"pair {_f(r['pair_us'])}   {_f(r['over_smallest'], 'x')} of the smallest"
                         f"   (final state {r['final_state']})")
    if "lsmem" in res:
        lines.append("")
        ls = res["lsmem"]
        if "skipped" in ls:
            lines.append(f"3. lsmem: skipped ({ls['skipped']})")
        else:
            lines.append(f"3. lsmem --sysroot, seconds (median of {ls['runs']}; cold: the first run "
                         f"after mounting)")
            lines.append(f"   {'blocks':>7} {'cmd':<9} {'memfs':>8} {'cold':>8} {'tmpfs':>8} | "
                         f"{'memfs/tmpfs':>11} {'cold/tmpfs':>10} same-output")
            for r in ls["sizes"]:
                for key, label in (("lsmem", "lsmem"), ("lsmem_a", "lsmem -a")):
                    x = r[key]
                    lines.append(f"   {r['blocks']:>7} {label:<9} {x['memfs_s']:>8.3f} {x['memfs_cold_s']:>8.3f} "
                                 f"{x['tmpfs_s']:>8.3f} | {_f(x['memfs_over_tmpfs'], 'x'):>11} "
                                 f"{_f(x['memfs_cold_over_tmpfs'], 'x'):>10} {x['same_output']}")
    if "model" in res:
        lines.append("")
        mo = res["model"]
        lines.append(f"4. model alone, us per state_store online+offline pair (median of {mo['pairs']})")
        for r in mo["sizes"]:
            lines.append(f"   {r['blocks']:>7} blocks: {r['pair_us']:>8.2f} us   "
                         f"{_f(r['over_smallest'], 'x'):>6} of the smallest   (boot {r['boot_s']:.3f} s)")
    if "mount" in res:
        lines.append("")
        mt = res["mount"]
        lines.append("5. mount time (until stat of block_size_bytes) and daemon RSS")
        for r in mt["sizes"]:
            lines.append(f"   {r['blocks']:>7} blocks: ready {r['ready_s']:.3f} s   RSS {_f(r['rss_mib'])} MiB, "
                         f"{_f(r['rss_after_half_mib'])} after {r['ops'] // 2} reads, "
                         f"{_f(r['rss_after_all_mib'])} after {r['ops']}")
    if "concurrency" in res:
        c = res["concurrency"]
        lines.append("")
        lines.append(f"6. concurrent readers of state ({c['seconds']} s each)")
        lines.append(f"   1 reader {_f(c['one_ops_s'])} ops/s   {c['readers']} readers {_f(c['many_ops_s'])} ops/s"
                     f" aggregate   ({_f(c['many_over_one'], 'x')})")
    if res.get("targets"):
        lines.append("")
        lines.append("targets: " + ", ".join(f"{k} {'MET' if v else 'NOT met' if v is not None else '?'}"
                                             for k, v in res["targets"].items()))
    return "\n".join(lines)


SECTIONS = ("attr", "writes", "lsmem", "model", "mount", "concurrency")


@contextlib.contextmanager
def _scratch(parent: str | None = None) -> Iterator[tuple[str, str]]:
    """Fresh mount and static-copy directories (under ``parent`` if given, else /tmp and /dev/shm)."""
    if parent is not None and not os.path.realpath(parent).startswith("/tmp/"):
        raise ValueError(f"--workdir {parent}: the bench mounts only under /tmp")
    work = tempfile.mkdtemp(prefix="memfs-bench-", dir=parent or "/tmp")
    shm_parent = parent or ("/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
                            else "/tmp")
    shm = tempfile.mkdtemp(prefix="memfs-bench-static-", dir=shm_parent)
    try:
        yield work, shm
    finally:
        for entry in os.listdir(work):
            p = os.path.join(work, entry)
            if os.path.isdir(p):
                _unmount(p)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


def run(plan: dict, sections: tuple[str, ...], quick: bool,
        progress: Callable[[str], None] = lambda s: None, workdir: str | None = None) -> dict:
    res: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "quick": quick, "machine": machine_info(), "plan": plan,
    }
    with _scratch(workdir) as (work, shm):
        steps = {
            "attr": lambda: bench_attr(work, shm, plan),
            "writes": lambda: bench_writes(work, plan),
            "lsmem": lambda: bench_lsmem(work, shm, plan),
            "model": lambda: bench_model(plan),
            "mount": lambda: bench_mount(work, plan),
            "concurrency": lambda: bench_concurrency(work, plan),
        }
        for name in sections:
            progress(f"bench: {name} ...")
            t = time.perf_counter()
            res[name] = steps[name]()
            res[name]["section_s"] = round(time.perf_counter() - t, 2)
    res["targets"] = targets(res)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small machines and counts (CI, tests)")
    ap.add_argument("--json", metavar="PATH", help="where to write the results "
                    "(default bench-results/bench-<date>.json)")
    ap.add_argument("--only", metavar="SECTIONS", help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--workdir", default=None, metavar="DIR",
                    help="scratch directory under /tmp for mounts and static copies "
                         "(default: fresh ones in /tmp and /dev/shm)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=N",
                    help="override a plan count, e.g. attr_ops=500 or lsmem_blocks=1024,8192")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("scripts/bench: needs root (FUSE mounts with allow_other)", file=sys.stderr)
        return 2
    plan = dict(QUICK if a.quick else FULL)
    for o in a.overrides:
        key, _, value = o.partition("=")
        if key not in plan:
            ap.error(f"--set {key}: unknown; one of {', '.join(plan)}")
        if isinstance(plan[key], list):
            plan[key] = [int(v) for v in value.split(",")]
        else:
            plan[key] = type(plan[key])(value)
    sections = tuple(s for s in (a.only.split(",") if a.only else SECTIONS) if s)
    for s in sections:
        if s not in SECTIONS:
            ap.error(f"--only: unknown section {s!r}")
    res = run(plan, sections, a.quick, progress=lambda s: print(s, file=sys.stderr, flush=True), workdir=a.workdir)
    out = a.json or os.path.join("bench-results",
                                 f"bench-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    print(format_table(res))
    print(f"\nresults written to {os.path.abspath(out)}")
    return 0
