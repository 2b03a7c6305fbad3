"""State that survives the daemon: ``memfs mount --state FILE`` through real daemons.

Every change whose write(2) or control request returned success is found again after a
SIGKILL at any moment; the restored machine is the saved one exactly (digest of the whole
model state); a corrupt, foreign, in-use or other-description state file is refused with a
clear message and no mount; a disk that fills up stops the daemon before it acknowledges
a change it could not save; the systemd unit's command lines resume after a kill; a
process in the sandbox sees only memfs files or ENOTCONN, never the host's.
"""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from memfs import persist
from memfs.daemon import FSTYPE, mounts_at
from memfs.machine.config import load_config
from tests.reliability_support import (Reference, count, daemon, env_int, invariants, log_problems,
                                       pwrite)

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, allow_other, /run/memfs)"),
              pytest.mark.usefixtures("reliability_figures")]

MEM = "sys/devices/system/memory"




def state_args(d_base: Path, *more: str) -> list[str]:
    return ["--no-sandbox", "--state", str(d_base / "machine.state"), *more]


def write(path: Path, data: bytes) -> int | None:
    """One write(2) of data; None on success, else the errno."""
    return pwrite(path, data)


# Each change, as a write to the mount (path, bytes) or a control request (op, fields),
# applied to the daemon and to the reference model alike.
CHANGES = [
    ("write", f"{MEM}/memory32/state", b"online_movable"),
    ("write", f"{MEM}/memory33/online", b"1"),
    ("write", f"{MEM}/auto_online_blocks", b"online"),
    ("write", "sys/module/memory_hotplug/parameters/auto_movable_ratio", b"150"),
    ("write", "sys/module/memory_hotplug/parameters/online_policy", b"auto-movable"),
    ("write", f"{MEM}/memory34/uevent", b"change"),
    ("write", f"{MEM}/hard_offline_page", b"0x100123000"),
    ("write", f"{MEM}/memory32/state", b"offline"),
    ("call", "plug", {"size": "256M", "id": "extra"}),
    ("call", "alloc", {"kind": "movable", "size": "8M", "block": 33}),
    ("call", "alloc", {"kind": "unmovable", "size": "4M"}),
    ("call", "free", {"id": "LAST_ALLOC"}),
    ("write", "sys/bus/acpi/devices/PNP0C80:01/eject", b"1"),
    ("call", "unplug", {"id": "extra"}),
    ("write", f"{MEM}/memory35/state", b"online_kernel"),
]


def apply_change(d, ref: Reference, change) -> None:
    kind, what, arg = change
    if arg == {"id": "LAST_ALLOC"}:
        arg = {"id": max(i for i, a in ref.m.allocator.allocs.items() if a.label == "user")}
    if kind == "write":
        got = write(d.path / what, arg)
        want = ref.write(what, arg)
        assert got == want, (what, arg, got, want)
    else:
        try:
            d.call(what, **arg)
            got = None
        except Exception as e:  # ControlError
            got = getattr(e, "errno", e)
        r = ref.handler.handle_line(json.dumps({"op": what, **arg}))
        assert got == (None if r["ok"] else r["errno"]), (what, arg, got, r)


def test_every_kind_of_change_survives_sigkill_right_after_it():
    """Write, SIGKILL at once (no other request in between), remount: it is there, and the
    whole machine equals the reference model that made the same changes."""
    ref = Reference()
    with daemon(mount=False) as d:
        d.args = state_args(d.base)
        d.mount()
        for i, change in enumerate(CHANGES):
            apply_change(d, ref, change)
            d.kill()  # the acknowledged change must already be on disk
            assert mounts_at(d.path) == [FSTYPE]
            d.mount()  # cleans the dead mount, resumes from the state file
            assert d.digest() == ref.digest(), f"after change {i} {change}"
            count("crashes survived")
            count("acknowledged changes checked after a crash")
        s = d.status()
        assert s["seqnum"] == ref.m.events.seqnum and not invariants(s)
        assert (d.memory / "memory35/state").read_text() == "online\n"
        assert (d.memory / "memory32/valid_zones").read_text() == ref.resolve(f"{MEM}/memory32/valid_zones").show()
        assert not log_problems(d.log()), log_problems(d.log())


# A virtio-mem device that the hypervisor resizes (memfs resize): each resize, grown,
# shrunk, and shrunk only part-way (EBUSY: a busy block stays), must survive a SIGKILL.
RESIZES = [
    ("call", "plug", {"size": "1G", "id": "vm", "driver": "virtio_mem"}),
    ("call", "resize", {"id": "vm", "size": "512M"}),
    ("write", f"{MEM}/memory42/state", b"online_kernel"),
    ("write", f"{MEM}/memory43/state", b"online_movable"),
    ("call", "alloc", {"kind": "unmovable", "size": "4K", "block": 42}),
    ("call", "resize", {"id": "vm", "size": "1G"}),
    ("call", "resize", {"id": "vm", "size": "0"}),
]


def test_virtio_mem_resizes_survive_sigkill_right_after_them():
    ref = Reference()
    with daemon(mount=False) as d:
        d.args = state_args(d.base)
        d.mount()
        for i, change in enumerate(RESIZES):
            apply_change(d, ref, change)
            d.kill()
            d.mount()
            assert d.digest() == ref.digest(), f"after change {i} {change}"
            count("crashes survived")
        (dev,) = [x for x in d.status()["devices"] if x["id"] == "vm"]
        # the last shrink stopped at memory42 (the unmovable page): kept, the request pending
        assert (dev["requested"], dev["plugged"], dev["blocks"]) == (0, 128 << 20, [42])
        assert (d.memory / "memory42/state").read_text() == "online\n"
        assert not (d.memory / "memory43").exists()
        assert not log_problems(d.log()), log_problems(d.log())


def test_sigkill_during_concurrent_changes_loses_no_acknowledged_one():
    """Writers on the mount and the control socket; SIGKILL at a random moment; each
    round, every acknowledged change is in the file, in order, with at most the one
    in flight per writer beyond it; the restored machine is what the file holds."""
    rounds = env_int("MEMFS_RELIABILITY_CRASH_ROUNDS", 6)
    rng = random.Random(20261126)
    with daemon(mount=False, env={"MEMFS_STATE_COMPACT_EVERY": "0"}) as d:
        d.args = state_args(d.base)
        statefile = d.base / "machine.state"
        d.mount()
        cfg = load_config(None)
        acked_total = 0
        for rnd in range(rounds):
            start = len(persist.read_journal(str(statefile))[1])
            stop = threading.Event()
            acked: dict[str, list] = {}
            errors: list[str] = []

            def fuse_writer(block: int) -> None:
                key = f"b{block}"
                acked[key] = []
                p = d.memory / f"memory{block}/online"
                v = rnd % 2 == 0
                while not stop.is_set():
                    v = not v
                    got = write(p, b"1" if v else b"0")
                    if got is None:
                        acked[key].append(v)
                    elif got == errno.EBUSY:
                        continue  # a plug put its memmap on the block: a refusal, not a change
                    elif got in (errno.ENOTCONN, errno.ECONNABORTED, errno.ENOENT):
                        return  # the daemon is gone: this write was never acknowledged
                    else:
                        errors.append(f"memory{block}/online: {errno.errorcode.get(got, got)}")
                        return

            def control_writer() -> None:
                acked["plug"] = []
                i = 0
                try:
                    c = d.client(timeout=10)
                except Exception:
                    return
                with c:
                    while not stop.is_set():
                        i += 1
                        dev = f"r{rnd}w{i}"
                        try:
                            c.call("plug", size="128M", id=dev, driver="virtio_mem")
                            acked["plug"].append(["plug", dev])
                            c.call("unplug", id=dev)
                            acked["plug"].append(["unplug", dev])
                        except Exception:
                            return  # the daemon is gone (or the reply was lost: not acknowledged)
            threads = [threading.Thread(target=fuse_writer, args=(b,)) for b in (36, 37, 38)]
            threads.append(threading.Thread(target=control_writer))
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.2, 1.2))
            d.kill()
            stop.set()
            for t in threads:
                t.join(30)
            assert not any(t.is_alive() for t in threads), "a writer hangs on the dead mount"
            assert not errors, errors
            entries = persist.read_journal(str(statefile))[1][start:]
            for block in (36, 37, 38):
                done = [e[1][1] for e in entries if e[0] == "online_store" and e[1][0] == block and e[3] is None]
                want = acked[f"b{block}"]
                assert done[:len(want)] == want and len(done) - len(want) in (0, 1), (rnd, block, want, done)
            done = [[e[0], e[1][0] if e[0] == "unplug" else e[2]["dev_id"]] for e in entries
                    if e[0] in ("plug", "unplug") and e[3] is None]
            want = acked["plug"]
            assert done[:len(want)] == want and len(done) - len(want) in (0, 1), (rnd, want, done)
            acked_total += sum(len(v) for v in acked.values())
            saved = persist.digest(persist.load_machine(str(statefile), cfg))
            d.mount()
            assert d.digest() == saved
            assert not invariants(d.status())
            count("crashes survived")
        count("acknowledged changes checked after a crash", acked_total)
        # and the whole history replays on a fresh machine to the same state
        _, entries = persist.read_journal(str(statefile))
        fresh, mismatches = persist.replay_fresh(entries, cfg)
        assert mismatches == 0 and persist.digest(fresh) == d.digest()
        assert not log_problems(d.log()), log_problems(d.log())


def test_clean_umount_compacts_and_the_next_mount_resumes():
    with daemon(mount=False) as d:
        d.args = state_args(d.base)
        d.mount()
        (d.memory / "memory32/state").write_text("online")
        d.call("plug", size="1G", driver="virtio_mem", id="vm")
        want = d.digest()
        seq = d.status()["seqnum"]
        assert d.umount().returncode == 0 and mounts_at(d.path) == []
        header, entries = persist.read_journal(str(d.base / "machine.state"))
        assert header["ops"] == 2 and header["checkpoint"] is not None and entries == []
        d.mount()
        assert d.digest() == want and d.status()["seqnum"] == seq
        info = d.call("state")["state"]
        assert info["ops"] == 2 and info["restored"]["ops"] == 2 and not info["restored"]["created"]
        assert "restored 2 operations" in d.log()


def test_state_file_of_another_description_is_refused():
    with daemon(mount=False) as d:
        d.args = state_args(d.base)
        d.mount()
        (d.memory / "memory32/state").write_text("online")
        d.umount()
        before = (d.base / "machine.state").read_bytes()
        r = d.mount("--kernel", "6.8", "--set", "hotplug.slots=4", check=False)
        assert r.returncode == 2, r.stderr
        assert "made for another machine description" in r.stderr
        assert 'kernel: the file has "6.1", this mount "6.8"' in r.stderr and "slots" in r.stderr
        assert mounts_at(d.path) == [] and (d.base / "machine.state").read_bytes() == before
        d.mount()  # the original description still works
        assert (d.memory / "memory32/state").read_text() == "online\n"


@pytest.mark.parametrize("damage", ["flip a header byte", "flip a journal byte", "foreign", "empty",
                                    "newer format", "edited outcome"])
def test_corrupt_state_file_is_refused_and_nothing_is_mounted(damage):
    with daemon(mount=False, env={"MEMFS_STATE_COMPACT_EVERY": "0"}) as d:
        d.args = state_args(d.base)
        sf = d.base / "machine.state"
        d.mount()
        for b in (32, 33, 34):
            (d.memory / f"memory{b}/state").write_text("online")
        d.kill()
        data = bytearray(sf.read_bytes())
        lines = bytes(data).split(b"\n")
        if damage == "flip a header byte":
            data[len(lines[0]) + 30] ^= 4
        elif damage == "flip a journal byte":
            data[len(lines[0]) + len(lines[1]) + 2 + 5] ^= 1
        elif damage == "foreign":
            data = bytearray(Path("/etc/hostname").read_bytes() if os.path.exists("/etc/hostname") else b"x\n")
        elif damage == "empty":
            data = bytearray()
        elif damage == "newer format":
            data[len("memfs-state ")] = ord("9")
        else:  # a valid line whose outcome the model does not give
            header = persist.parse(bytes(data))
            line = persist._entry_line(len(header.entries) + 1, persist._salt(header.hash),
                                       ["state_store", [32, 1], {}, None])  # 32 is online: EINVAL
            data += line
        sf.write_bytes(bytes(data))
        r = d.mount(check=False)
        assert r.returncode == 1, r.stderr
        words = {"flip a header byte": "is corrupt", "flip a journal byte": "is corrupt",
                 "foreign": "not a memfs state file", "empty": "is empty",
                 "newer format": "state format 9", "edited outcome": "different outcome"}[damage]
        assert words in r.stderr and str(sf) in r.stderr, r.stderr
        # nothing new is mounted (the dead mount stays: nothing resumes), the file is untouched
        assert mounts_at(d.path) == [FSTYPE]
        with pytest.raises(OSError) as ei:
            os.listdir(d.memory)
        assert ei.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        assert sf.read_bytes() == bytes(data)
        count("corrupt or foreign state files refused")


def test_torn_final_line_after_a_crash_is_dropped():
    with daemon(mount=False, env={"MEMFS_STATE_COMPACT_EVERY": "0"}) as d:
        d.args = state_args(d.base)
        sf = d.base / "machine.state"
        d.mount()
        (d.memory / "memory32/state").write_text("online")
        want = d.digest()
        d.kill()
        with open(sf, "ab") as f:  # what a crash inside write(2) could leave: never acknowledged
            f.write(b'2 1234abcd ["state_store", [33, 1], {}, nu')
        d.mount()
        assert d.digest() == want
        assert "dropping a torn final line" in d.log()
        (d.memory / "memory33/state").write_text("online")
        d.kill()
        d.mount()
        assert (d.memory / "memory33/state").read_text() == "online\n"
        assert len(persist.read_journal(str(sf))[1]) == 2


def test_one_state_file_serves_one_mount():
    with daemon(mount=False) as a, daemon(mount=False) as b:
        shared = a.base / "machine.state"
        a.args = ["--no-sandbox", "--state", str(shared)]
        a.mount()
        b.args = ["--no-sandbox", "--state", str(shared)]
        r = b.mount(check=False)
        assert r.returncode == 1 and "in use by another memfs daemon" in r.stderr
        assert FSTYPE not in mounts_at(b.path)


def test_full_disk_stops_the_daemon_before_it_acknowledges():
    """The state file on a tiny tmpfs (mounted under /tmp, removed after): once it is full,
    the change that cannot be saved is not acknowledged (the daemon stops: exit 74), and
    after space is freed the next mount has every change that was acknowledged."""
    ref = Reference()
    with daemon(mount=False, env={"MEMFS_STATE_COMPACT_EVERY": "0"}) as d:
        small = d.base / "small"
        small.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "memfs-test-small", str(small)],
                       check=True, timeout=10)
        try:
            d.args = ["--no-sandbox", "--state", str(small / "machine.state")]
            d.mount()
            pid = d.pid
            filler = small / "filler"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                while True:
                    os.write(fd, b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
            finally:
                os.close(fd)
            # the state file's last page still has room for some lines: go on until one fails
            failed = None
            for i in range(500):
                rel, data = f"{MEM}/memory{32 + i % 10}/online", b"1" if (i // 10) % 2 == 0 else b"0"
                got = write(d.path / rel, data)
                if got is not None:
                    failed = got
                    break
                assert ref.write(rel, data) is None
            assert failed in (errno.ENOTCONN, errno.ECONNABORTED), failed  # never success
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "cannot save online_store" in d.log() and "stopping now" in d.log()
            d.pid = None
            filler.unlink()
            d.mount()
            assert d.digest() == ref.digest()  # all acknowledged changes, and only those
            count("crashes survived")
            count("acknowledged changes checked after a crash", i)
        finally:
            d.umount()
            subprocess.run(["umount", "-l", str(small)], timeout=10)


def test_systemd_unit_restart_resumes_from_the_state_file(tmp_path):
    """ExecStart as systemd runs it (Type=notify), SIGKILL, ExecStart again (what
    Restart=on-failure does): the dead mount is cleaned and the machine resumes."""
    from tests.test_packaging import _unit_lines, unit_command
    u = _unit_lines()
    assert "StateDirectory" in u and any(e.startswith("MEMFS_STATE=/var/lib/memfs/%i.state") for e in u["Environment"])
    with daemon(mount=False) as d:
        env_vars = {"MEMFS_MOUNT": str(d.path), "MEMFS_CONFIG": str(d.base / "lab.toml"),
                    "MEMFS_STATE": str(d.base / "lab.state")}
        from memfs.machine.config import default_text
        Path(env_vars["MEMFS_CONFIG"]).write_text(default_text())
        argv = [*unit_command(u["ExecStart"][0], env_vars), "--no-sandbox"]

        def start() -> subprocess.Popen:
            notify = d.base / "notify"
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
                if notify.exists():
                    notify.unlink()
                ns.bind(str(notify))
                ns.settimeout(60)
                p = subprocess.Popen(argv, env=dict(os.environ, NOTIFY_SOCKET=str(notify)),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                d.pids.append(p.pid)
                assert "READY=1" in ns.recv(4096).decode()
            return p
        p = start()
        try:
            (d.memory / "memory32/state").write_text("online")
            d.call("plug", size="256M", id="svc")
            p.kill()
            p.wait(15)
            assert p.returncode == -signal.SIGKILL
            p = start()
            assert (d.memory / "memory32/state").read_text() == "online\n"
            assert "svc" in [x["id"] for x in d.status()["devices"]]
            count("crashes survived")
        finally:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)


def test_sandbox_process_sees_enotconn_never_the_host_files():
    """A command running in the sandbox while the daemon is SIGKILLed reads memfs files or
    fails (ENOTCONN, or is killed with the sandbox, whose holder dies with the daemon),
    never the host's /sys: this machine has 1 GiB blocks (block_size_bytes 40000000, a host
    has 8000000) and its hot-plugged block is memory512 (no host has one at 512 GiB)."""
    from memfs.machine.config import default_text
    text = default_text()
    text = text[:text.index("[[dimm]]")] + '[[dimm]]\nid = "big"\nsize = "1G"\n'
    text = text.replace('block_size = "auto"', 'block_size = "1G"').replace('base = "4G"', 'base = "512G"')
    script = ("for i in $(seq 1 100); do cat /sys/devices/system/memory/block_size_bytes 2>&1; "
              "cat /sys/devices/system/memory/memory512/state 2>&1; sleep 0.05; done")
    with daemon(mount=False) as d:
        cfg = d.base / "machine.toml"
        cfg.write_text(text)
        d.args = ["--sandbox", "--config", str(cfg), "--state", str(d.base / "machine.state")]
        r = d.mount(check=False)
        if r.returncode != 0:
            pytest.skip(f"the sandbox does not work here: {r.stderr.strip()}")
        (d.memory / "memory512/state").write_text("online")
        out = d.base / "inside.out"
        with open(out, "wb") as f:
            p = subprocess.Popen([sys.executable, "-m", "memfs", "exec", str(d.path), "--", "sh", "-c", script],
                                 stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while out.read_bytes().count(b"\nonline\n") < 3 and time.monotonic() < deadline and p.poll() is None:
                time.sleep(0.05)
            d.kill()
            p.wait(60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        seen = out.read_text(errors="replace").splitlines()
        assert seen.count("40000000") >= 3 and seen.count("online") >= 3, seen[:10]
        assert "8000000" not in seen and not any("No such file" in line for line in seen), seen
        sandbox_lines = [line for line in seen if line not in ("40000000", "online")]
        # a request in flight when the daemon dies fails ECONNABORTED, later ones ENOTCONN
        assert all("Transport endpoint is not connected" in line or "Software caused connection abort" in line
                   or "memfs" in line or "Traceback" in line
                   or line.startswith((" ", "OSError")) for line in sandbox_lines), sandbox_lines
        d.mount()  # resumes, with a new sandbox
        r = subprocess.run([sys.executable, "-m", "memfs", "exec", str(d.path), "--", "cat",
                            "/sys/devices/system/memory/memory512/state", "/sys/devices/system/memory/block_size_bytes"],
                           capture_output=True, text=True, timeout=60)
        assert r.stdout == "online\n40000000\n", r.stderr
        count("crashes survived")
