"""memfs plug / unplug / alloc / free / events / status through the CLI, seen through the mount."""
from __future__ import annotations

import errno
import json
import os

import pytest

from memfs.pytest_plugin import fuse_unavailable
from memfs.status import LEGEND

pytestmark = [
    pytest.mark.skipif(fuse_unavailable() is not None, reason=fuse_unavailable() or ""),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (allow_other)"),
]


def _visible(s: dict) -> dict:
    """What an unplug that changed nothing must leave alone."""
    return {k: s[k] for k in ("blocks", "devices", "allocations", "meminfo", "nodes", "hotplug")}


def test_plug_blocks_appear_at_once_offline_with_add_events(memfs_mount):
    m = memfs_mount()
    seq = m.status()["seqnum"]
    r = m.cli("plug", "--size", "256M")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "dimm4: memory42 (offline) memory43 (offline)\n"
    for b in (42, 43):
        assert (m.memory / f"memory{b}/state").read_text() == "offline\n"
        assert f"memory{b}" in os.listdir(m.memory)
        assert (m.path / f"sys/devices/system/node/node0/memory{b}").is_dir()
    assert (m.memory / "memory42/firmware_node").resolve().name == "PNP0C80:03"
    ev = json.loads(m.cli("events", "--since", str(seq), "--json").stdout)
    assert [(e["action"], e["devpath"]) for e in ev["events"]] == [
        ("add", "/devices/system/memory/memory42"), ("add", "/devices/system/memory/memory43")]
    text = m.cli("events", "--since", str(seq)).stdout.splitlines()
    assert text[0].split() == [str(seq + 1), "add", "/devices/system/memory/memory42", "(memory)"]

    r = m.cli("plug", "--size", "128M", "--addr", "0x200000000", "--id", "big", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["device"]["id"] == "big" and out["device"]["start"] == 0x200000000
    assert out["blocks"] == [{"id": 64, "state": "offline"}]
    r = m.cli("plug", "--size", "256M", "--driver", "virtio_mem", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["device"]["slot"] is None
    r = m.cli("plug", "--size", "128M", "--driver", "dax_kmem", "--memmap-on-memory")
    assert r.returncode == 1 and "not supported" in r.stderr  # a 6.1 kernel has no dax/kmem switch


@pytest.mark.parametrize("args, code, words", [
    (["--size", "100M"], 1, "multiple of the block size"),
    (["--size", "lots"], 2, "expected a size"),
    (["--size", "128M", "--node", "3"], 1, "node 3"),
    (["--size", "128M", "--id", "dimm1"], 1, "exists already"),
    (["--size", "128M", "--addr", "0x100000000"], 1, "overlaps"),
    (["--size", "128M", "--memmap-on-memory"], 1, "dax_kmem only"),
    (["--size", "128M", "--driver", "floppy"], 2, "invalid choice"),
])
def test_plug_errors(memfs_mount, args, code, words):
    m = memfs_mount()
    before = _visible(m.status())
    r = m.cli("plug", *args)
    assert r.returncode == code and words in r.stderr, r.stderr
    assert _visible(m.status()) == before


def test_unplug_with_the_state_file_held_open(memfs_mount):
    m = memfs_mount()
    assert m.cli("plug", "--size", "128M", "--id", "extra").returncode == 0
    blk = m.status()["devices"][-1]["blocks"][0]
    path = m.memory / f"memory{blk}/state"
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.write(fd, b"online") == 6
        assert path.read_text() == "online\n"
        seq = m.status()["seqnum"]
        r = m.cli("unplug", "extra")
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"extra: removed memory{blk}\n"
        for op in (lambda: os.pread(fd, 100, 0), lambda: os.write(fd, b"offline")):
            with pytest.raises(OSError) as ei:
                op()
            assert ei.value.errno == errno.ENODEV
        with pytest.raises(FileNotFoundError):
            os.open(path, os.O_RDONLY)
        assert f"memory{blk}" not in os.listdir(m.memory)
        ev = m.call("events", since=seq)["events"]
        assert [(e["action"], e["devpath"]) for e in ev] == [
            ("offline", f"/devices/system/memory/memory{blk}"), ("remove", f"/devices/system/memory/memory{blk}")]
    finally:
        os.close(fd)


def test_unplug_refused_when_an_unmovable_allocation_pins_a_block(memfs_mount):
    m = memfs_mount()
    (m.memory / "memory33/state").write_text("online_kernel")  # dimm2, ZONE_NORMAL
    r = m.cli("alloc", "--unmovable", "4M", "--block", "33")
    assert r.returncode == 0, r.stderr
    aid = int(r.stdout)
    before = _visible(m.status())
    r = m.cli("unplug", "dimm2")
    assert r.returncode == 3, r.stderr
    assert "cannot unplug dimm2" in r.stderr and "nothing changed" in r.stderr
    assert _visible(m.status()) == before
    assert (m.memory / "memory33/state").read_text() == "online\n"
    assert m.cli("free", str(aid)).returncode == 0
    r = m.cli("unplug", "dimm2")
    assert r.returncode == 0, r.stderr
    assert not (m.memory / "memory33").exists()


def test_movable_allocations_migrate_on_unplug(memfs_mount):
    m = memfs_mount()
    (m.memory / "memory32/state").write_text("online_movable")
    r = m.cli("alloc", "--movable", "4M", "--block", "32", "--json")
    a = json.loads(r.stdout)
    assert a["blocks"] == {"32": 1024} and a["kind"] == "movable"
    assert m.cli("unplug", "dimm1").returncode == 0
    moved = next(x for x in m.status()["allocations"] if x["id"] == a["id"])
    assert "32" not in moved["blocks"] and sum(moved["blocks"].values()) == 1024


def test_alloc_and_free_errors(memfs_mount):
    m = memfs_mount()
    r = m.cli("alloc", "--unmovable", "4M", "--block", "32")  # offline block
    assert r.returncode == 1 and "not online" in r.stderr
    r = m.cli("alloc", "4M")
    assert r.returncode == 2  # one of --movable/--unmovable is required
    r = m.cli("free", "999")
    assert r.returncode == 1 and "no allocation 999" in r.stderr
    kernel = next(a["id"] for a in m.status()["allocations"] if a["label"] != "user")
    r = m.cli("free", str(kernel))
    assert r.returncode == 1 and "belongs to the kernel" in r.stderr
    r = m.cli("unplug", "nosuch")
    assert r.returncode == 1 and "no device 'nosuch'" in r.stderr


def test_status_text_and_json(memfs_mount):
    m = memfs_mount()
    (m.memory / "memory32/state").write_text("online_movable")
    r = m.cli("status")
    assert r.returncode == 0, r.stderr
    assert LEGEND in r.stdout
    assert "     0  XDDDDDDD" + "_" * 24 + "|m|:|........|" in r.stdout
    assert "MemTotal:" in r.stdout and "dimm3" in r.stdout
    s = json.loads(m.cli("status", "--json").stdout)
    assert {"mountpoint", "pid", "control_socket", "config", "state_file", "kernel", "arch", "block_size",
            "meminfo", "nodes", "blocks", "devices", "allocations", "seqnum"} <= set(s)
    b32 = next(b for b in s["blocks"] if b["id"] == 32)
    assert b32["state"] == "online" and b32["zones"] == ["Movable"] and b32["memmap_on_memory"]
    mem = {line.split(":")[0]: int(line.split()[1])
           for line in (m.path / "proc/meminfo").read_text().splitlines()[:2]}
    assert mem == {"MemTotal": s["meminfo"]["MemTotal"], "MemFree": s["meminfo"]["MemFree"]}
    movable = next(z for z in s["nodes"][0]["zones"] if z["name"] == "Movable")
    assert movable["present"] == 32768 and movable["vmemmap"] == 512
    assert movable["managed"] == 32768 - 512


def test_events_wait(memfs_mount):
    m = memfs_mount()
    seq = m.status()["seqnum"]
    r = m.cli("events", "--since", str(seq), "--wait", "0.3", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["events"] == []
    (m.memory / "memory33/state").write_text("online")
    r = m.cli("events", "--since", str(seq), "--wait", "5", "--json")
    assert [e["action"] for e in json.loads(r.stdout)["events"]] == ["online"]


def test_resize_a_virtio_mem_device(memfs_mount, tmp_path):
    """The f_virtio_mem steps through the CLI and the mount: grow (blocks offline, no
    firmware_node), online, shrink from the top; a busy block makes the shrink exit 3."""
    cfg = tmp_path / "vm.toml"
    cfg.write_text(
        '[[node]]\nid = 0\nram = ["0x100000-0x40000000"]\n'
        '[[dimm]]\nid = "vm0"\nsize = "2G"\ndriver = "virtio_mem"\n')
    m = memfs_mount(config=cfg)
    r = m.cli("resize", "vm0", "512M")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ("vm0: requested 512M, plugged 512M: memory32 (offline) memory33 (offline) "
                        "memory34 (offline) memory35 (offline)\n")
    assert (m.memory / "memory32/valid_zones").read_text() == "Normal Movable\n"
    assert not os.path.lexists(m.memory / "memory32/firmware_node")
    (m.memory / "memory32/state").write_text("online_kernel")
    for b in (33, 34, 35):
        (m.memory / f"memory{b}/state").write_text("online_movable")
    dev = next(d for d in m.status()["devices"] if d["id"] == "vm0")
    assert (dev["size"], dev["requested"], dev["plugged"]) == (2 << 30, 512 << 20, 512 << 20)
    seq = m.status()["seqnum"]
    r = m.cli("resize", "vm0", "256M", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["blocks"] == [{"id": 32, "state": "online"}, {"id": 33, "state": "online"}]
    ev = json.loads(m.cli("events", "--since", str(seq), "--json").stdout)["events"]
    assert [(e["action"], e["devpath"].rsplit("/", 1)[1]) for e in ev] == [
        ("offline", "memory35"), ("remove", "memory35"), ("offline", "memory34"), ("remove", "memory34")]
    assert not (m.memory / "memory35").exists()
    a = json.loads(m.cli("alloc", "--unmovable", "4K", "--block", "32", "--json").stdout)
    r = m.cli("resize", "vm0", "0")
    assert r.returncode == 3, r.stderr
    assert "could not be unplugged" in r.stderr and "memfs free" in r.stderr
    # memory33 (Movable) went; memory32 (Normal) holds the unmovable page and stays
    assert sorted(p.name for p in m.memory.glob("memory3?")) == ["memory32"]
    assert m.cli("free", str(a["id"])).returncode == 0
    assert m.cli("resize", "vm0", "0").returncode == 0
    assert not (m.memory / "memory32").exists()
    r = m.cli("resize", "vm0", "100M")
    assert r.returncode == 1 and "multiple of the memory block size" in r.stderr
    r = m.cli("resize", "dimm-none", "128M")
    assert r.returncode == 1 and "no device" in r.stderr
    r = m.cli("plug", "--size", "1G", "--driver", "virtio_mem", "--requested", "256M", "--id", "vm1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "vm1: memory48 (offline) memory49 (offline)\n"  # after vm0's 2 GiB region (32-47)
    r = m.cli("plug", "--size", "1G", "--requested", "256M")
    assert r.returncode == 2 and "--requested is for --driver virtio_mem" in r.stderr
