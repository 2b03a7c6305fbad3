"""memfs status: the snapshot's keys and the text rendering (memory map, legend)."""
from __future__ import annotations

from memfs.machine.hotplug import Machine
from memfs.status import LEGEND, id_ranges, memory_map, render_text, snapshot

TOP_KEYS = {"schema", "version", "kernel", "arch", "page_size", "block_size", "auto_online_blocks",
            "memmap_on_memory", "online_policy", "generation", "seqnum", "meminfo", "hotplug", "nodes",
            "blocks", "devices", "allocations"}
BLOCK_KEYS = {"id", "start", "size", "state", "online", "node", "nodes", "zones", "valid_zones", "device",
              "boot", "memmap_on_memory", "vmemmap_pages", "present_pages", "reserved_pages",
              "unmovable_pages", "movable_pages", "hwpoison_pages", "free_pages"}
ZONE_KEYS = {"name", "start_pfn", "spanned", "present", "managed", "vmemmap", "used", "free", "pcp"}
DEVICE_KEYS = {"id", "driver", "start", "size", "range", "node", "slot", "blocks", "memmap_on_memory",
               "requested", "plugged"}


def test_snapshot_keys():
    s = snapshot(Machine.from_config())
    assert set(s) == TOP_KEYS
    assert all(set(b) == BLOCK_KEYS for b in s["blocks"])
    assert all(set(z) == ZONE_KEYS for n in s["nodes"] for z in n["zones"])
    assert all(set(d) == DEVICE_KEYS for d in s["devices"])
    assert set(s["meminfo"]) >= {"MemTotal", "MemFree"}


def test_default_machine_map():
    m = Machine.from_config()
    lines = memory_map(snapshot(m))
    # block 0 spans DMA and DMA32, 1-7 DMA32, a hole, dimm1/dimm2 (memmap on memory), dimm3
    assert lines == ["     0  XDDDDDDD" + "_" * 24 + "|:|:|........|"]
    m.state_store(32, 3)  # online_movable
    m.state_store(34, 2)  # online_kernel
    assert memory_map(snapshot(m)) == ["     0  XDDDDDDD" + "_" * 24 + "|m|:|N.......|"]


def test_map_wraps_at_64_and_folds_empty_rows():
    m = Machine.from_config()
    m.plug(128 << 20, addr=20 << 30, dev_id="far")  # block 160
    lines = memory_map(snapshot(m))
    assert lines[0].startswith("     0  XDDDDDDD")
    assert lines[0].count("_") + sum(c in "XD.:|" for c in lines[0][8:]) == len(lines[0]) - 8
    assert lines[1] == "        (64 blocks 64-127: no memory)"  # an empty row is folded
    assert lines[2] == "   128  " + "_" * 32 + "|:|"
    body = lines[0][8:].replace("|", "")
    assert len(body) == 64


def test_fold_long_holes():
    m = Machine.from_config()
    m.plug(128 << 20, addr=26 << 30, dev_id="far")  # block 208
    lines = memory_map(snapshot(m))
    assert lines[1:] == ["        (128 blocks 64-191: no memory)",  # consecutive empty rows: one line
                         "   192  " + "_" * 16 + "|:|"]
    m.plug(128 << 20, addr=(1 << 40), dev_id="very-far")  # block 8192
    lines = memory_map(snapshot(m))
    assert lines[-2:] == ["        (7936 blocks 256-8191: no memory)", "  8192  |:|"]
    assert len(lines) == 5


def test_render_text_has_legend_and_numbers():
    m = Machine.from_config()
    text = render_text(snapshot(m, mountpoint="/mnt/x", pid=42))
    assert LEGEND in text
    assert "memfs at /mnt/x (daemon pid 42): kernel 6.1" in text
    assert f"MemTotal: {m.meminfo()['MemTotal']:>12} kB" in text
    assert "dimm3" in text and "34-41" in text
    assert "DMA32" in text


def test_id_ranges():
    assert id_ranges([]) == "-"
    assert id_ranges([5]) == "5"
    assert id_ranges([36, 32, 34, 35]) == "32,34-36"
