"""Sanity tests of tests/conformance/traces.py on the reference traces shipped in
tests/conformance/data. Missing data fails these tests: it is never a skip.
"""
import errno
import json
import lzma
import re
from pathlib import Path

import pytest

from . import traces as T

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(scope="module")
def a():
    return T.load_trace(T.TRACE_A)


@pytest.fixture(scope="module")
def b():
    return T.load_trace(T.TRACE_B)


# ------------------------------------------------------------------ helpers

def test_parse_size():
    assert T.parse_size("128M") == 128 * MiB
    assert T.parse_size("1G") == GiB
    assert T.parse_size("16g") == 16 * GiB
    assert T.parse_size(134217728) == 128 * MiB
    assert T.parse_size("4096") == 4096
    assert T.parse_size("512K") == 512 * 1024
    with pytest.raises(ValueError):
        T.parse_size("12Q")


def test_errno_from_strerror():
    assert T.errno_from_strerror("Invalid argument") == errno.EINVAL
    assert T.errno_from_strerror("Device or resource busy") == errno.EBUSY
    assert T.errno_from_strerror("Permission denied") == errno.EACCES
    assert T.errno_from_strerror("Numerical result out of range") == errno.ERANGE
    assert T.errno_from_strerror("No such device") == errno.ENODEV
    with pytest.raises(ValueError):
        T.errno_from_strerror("Something odd")


def test_the_repository_holds_every_recorded_trace():
    """The conformance data ships with memfs: every kernel, every scenario, loadable."""
    for kernel, scenarios in T.EXPECTED.items():
        assert T.traces_dir(kernel) == T.DATA / kernel, f"conformance data of {kernel} missing"
        assert T.trace_names(kernel) == sorted(scenarios), kernel
        info = (T.DATA / kernel / "kernel-info.txt").read_text()
        for name in scenarios:
            t = T.load_trace(name, kernel)
            assert t.completed and t.kernel == kernel, (kernel, name)
            # the build recorded is the one kernel-info.txt names
            assert t.header.uname in info, (kernel, name)
            want = kernel.removeprefix("arm64-")
            assert t.header.kernel_version == want, (kernel, name, t.header.uname)


def test_missing_data_is_an_error_not_a_skip(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMFS_REFERENCE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no traces of kernel 7.2 in .MEMFS_REFERENCE="):
        T.load_trace(T.TRACE_A, "7.2")


def test_release_strings():
    assert T.load_trace("a", "6.12").header.release == "6.12.117+deb13-amd64"
    assert T.load_trace("a", "7.2").header.release == "7.2.13+deb14-amd64"
    assert T.load_trace("a").header.release == "6.1.0-56-amd64"


def test_env_override(monkeypatch, tmp_path):
    real = T.traces_dir()
    assert real == T.DATA / "6.1"
    # a fresh recording laid out as the harness writes it: traces/ (6.1), traces-<kernel>/
    for harness, kernel in (("traces", "6.1"), ("traces-7.2", "7.2")):
        d = tmp_path / "ref" / harness / "a_memmap_on"
        d.mkdir(parents=True)
        (d / "trace.json").write_bytes(lzma.decompress((T.DATA / kernel / "a_memmap_on" / "trace.json.xz").read_bytes()))
        (d / "run-meta.json").write_bytes((T.DATA / kernel / "a_memmap_on" / "run-meta.json").read_bytes())
    monkeypatch.setenv("MEMFS_REFERENCE", str(tmp_path / "ref"))  # the harness folder
    assert T.traces_dir() == tmp_path / "ref" / "traces"
    assert T.traces_dir("7.2") == tmp_path / "ref" / "traces-7.2"
    assert T.load_trace("a", "7.2").header.kernel_version == "7.2"
    monkeypatch.setenv("MEMFS_REFERENCE", str(tmp_path / "ref" / "traces"))  # the 6.1 traces/ folder itself
    assert T.traces_dir() == tmp_path / "ref" / "traces"
    assert len(T.load_trace("a").writes()) == 67
    monkeypatch.setenv("MEMFS_REFERENCE", str(tmp_path))  # wrong: counts as absent
    assert T.traces_dir() is None
    assert T.trace_names() == []
    assert not T.have_trace(T.TRACE_A)
    with pytest.raises(FileNotFoundError):
        T.load_trace(T.TRACE_A)
    monkeypatch.delenv("MEMFS_REFERENCE")
    assert json.loads((T.DATA / "6.1" / "a_memmap_on" / "run-meta.json").read_text())["completed"]


def test_names_and_alias():
    names = T.trace_names()
    assert T.TRACE_A in names and T.TRACE_B in names
    assert T.load_trace("a").name == T.TRACE_A
    assert T.load_trace("b").name == T.TRACE_B
    with pytest.raises(FileNotFoundError):
        T.load_trace("no_such_trace")


# ------------------------------------------------------------------ header

def test_header(a, b):
    for t, mom in ((a, True), (b, False)):
        h = t.header
        assert t.completed
        assert h.scenario == "ab"
        assert h.memmap_on_memory is mom
        assert h.memhp_default_state == "offline"
        assert h.kernel_version == "6.1"
        assert h.kernel_params["memory_hotplug.memmap_on_memory"] == ("1" if mom else "0")
        assert h.qemu_args[0] == "qemu-system-x86_64"
        assert h.boot_mem == GiB and h.slots == 8 and h.maxmem == 16 * GiB
        assert t.cold_dimms == [("dimm1", 128 * MiB), ("dimm2", 128 * MiB), ("dimm3", GiB)]
        assert h.cold_dimm_nodes == {"dimm1": None, "dimm2": None, "dimm3": None}


def test_counts(a, b):
    for t in (a, b):
        assert len(t.dumps()) == 33
        assert len(t.writes()) == 67
        assert [d.step for d in t.dumps()] == list(range(1, 34))
        assert len(t.of_type(T.WaitGone)) == 5
        assert len(t.of_type(T.Waited)) == 2
        assert len(t.host_requests) == 22
        assert len(list(t.segments())) == 33
        assert t.trailing_steps() == []


# ------------------------------------------------------------------ boot dump

def test_boot_dump(a, b):
    for t in (a, b):
        d = t.boot
        assert d.step == 1 and d.label == "boot"
        assert d.blocks["memory0"]["valid_zones"] == "none"
        assert d.blocks["memory0"]["state"] == "online"
        for n in range(1, 8):
            assert d.blocks[f"memory{n}"]["valid_zones"] == "DMA32"
            assert d.blocks[f"memory{n}"]["online"] == "1"
        assert list(d.blocks) == [f"memory{n}" for n in list(range(8)) + list(range(32, 42))]
        m32 = d.blocks["memory32"]
        assert m32["state"] == "offline" and m32["online"] == "0"
        assert m32["valid_zones"] == "Normal Movable"
        assert m32["phys_index"] == "00000020"
        assert m32["phys_device"] == "0" and m32["removable"] == "1" and m32["uevent"] == ""
        assert m32["node0"] == "../../node/node0"
        assert m32["subsystem"] == "../../../../bus/memory"
        assert m32["firmware_node"].endswith("/PNP0C80:00")
        assert d.block_links("memory32") == {
            "firmware_node": "../../../LNXSYSTM:00/LNXSYBUS:00/PNP0A06:04/PNP0C80:00",
            "node0": "../../node/node0",
            "subsystem": "../../../../bus/memory",
        }
        assert "state" in d.block_files("memory32") and "node0" not in d.block_files("memory32")
        assert "firmware_node" not in d.blocks["memory1"]
        assert d.blocks["memory41"]["phys_index"] == "00000029"

        assert d.zones["DMA"] == {"spanned": 4095, "present": 3998, "managed": 3840,
                                  "free": d.zones["DMA"]["free"], "start_pfn": 1}
        assert d.zones["DMA32"]["spanned"] == 258016
        assert d.zones["DMA32"]["present"] == 258016
        assert d.zones["DMA32"]["managed"] == 225015
        assert d.zones["DMA32"]["start_pfn"] == 4096
        for z in ("Normal", "Movable"):
            assert d.zones[z]["spanned"] == 0 and d.zones[z]["start_pfn"] is None
        assert list(d.node_zones) == [0]

        assert d.mem_total == 915420
        assert d.node_meminfo["node0"]["MemTotal"] == 915420
        assert d.memory_top["block_size_bytes"] == "8000000"
        assert d.memory_top["auto_online_blocks"] == "offline"
        assert d.memory_top["uevent"] == ""
        assert d.memory_top["soft_offline_page"] is None
        assert d.read_errors[T.MEMORY + "/soft_offline_page"] == errno.EACCES
        assert d.read_errors[T.MEMORY + "/hard_offline_page"] == errno.EACCES
        assert d.params == {
            "auto_movable_numa_aware": "Y",
            "auto_movable_ratio": "301",
            "memmap_on_memory": "Y" if t is a else "N",
            "online_policy": "contig-zones",
        }
        assert d.node_state["has_memory"] == "0"
        assert d.node_links["node0"][-1] == "memory41" and len(d.node_links["node0"]) == 18
        assert d.uevents == []
        assert d.vmstat_memmap == []
        assert any("100000000-107ffffff : System RAM" in ln for ln in d.iomem_ram)

        assert sorted(d.acpi) == [f"PNP0C80:0{i}" for i in range(8)]
        assert d.acpi["PNP0C80:00"]["status"] == "15"
        assert d.acpi["PNP0C80:00"]["path"] == "\\_SB_.MHPC.MP00"
        assert d.acpi["PNP0C80:00"]["blocks"] == ["memory32"]
        assert d.acpi["PNP0C80:02"]["blocks"] == [f"memory{n}" for n in range(34, 42)]
        assert list(d.acpi["PNP0C80:02"]["physical_node"])[:2] == ["physical_node", "physical_node1"]
        assert d.acpi["PNP0C80:03"] == {"status": "0", "path": "\\_SB_.MHPC.MP03",
                                        "physical_node": {}, "blocks": []}
        assert d.files[T.MEMORY + "/memory32/state"] == {"rc": 0, "text": "offline"}


def test_boot_memfree_differs(a, b):
    # the two single-block DIMMs host their own memmap in trace a
    assert a.boot.mem_free - b.boot.mem_free == 3652


# ------------------------------------------------------------------ writes

def test_first_write(a):
    w = a.writes()[0]
    assert w.path == T.MEMORY + "/memory32/state"
    assert w.value == "online_movable" and w.newline and w.data == b"online_movable\n"
    assert w.rc == 0 and w.errno is None and w.ok and not w.at_open
    assert w.block == "memory32" and w.attr == "state"


def test_first_segment(a):
    segs = list(a.segments())
    acts, d = segs[1]
    assert d.step == 2
    assert [type(s).__name__ for s in acts] == ["Note", "Write"]
    assert d.state("memory32") == "online"
    assert d.blocks["memory32"]["valid_zones"] == "Movable"
    assert d.uevents == [{"ACTION": "online", "DEVPATH": "/devices/system/memory/memory32",
                          "SUBSYSTEM": "memory", "SEQNUM": 662}]


def test_ebusy(a, b):
    for t in (a, b):
        busy = [w for w in t.writes() if w.errno == errno.EBUSY]
        assert len(busy) == 3
        for w in busy:
            assert w.path == T.MEMORY + "/memory32/state" and w.value == "offline"
            assert w.rc == 1 and not w.at_open and w.errname == "EBUSY"
            assert w.err == "sh: write error: Device or resource busy"


def test_einval_and_eacces(a):
    ws = a.writes()
    einval = [w for w in ws if w.errno == errno.EINVAL]
    eacces = [w for w in ws if w.errno == errno.EACCES]
    assert len(einval) == 16
    assert sum(w.ok for w in ws) == 67 - 16 - 6 - 3
    assert len(eacces) == 6
    assert all(w.at_open for w in eacces) and not any(w.at_open for w in einval)
    assert {w.attr for w in eacces} == {"valid_zones", "phys_index", "removable", "phys_device",
                                        "block_size_bytes", "memmap_on_memory"}
    ratio = {w.value: w.errno for w in ws if w.attr == "auto_movable_ratio"}
    assert ratio == {"abc": errno.EINVAL, "-1": errno.EINVAL, "0": None, "301": None}
    empty = [w for w in ws if w.value == ""]
    assert len(empty) == 1 and empty[0].data == b"\n" and empty[0].errno == errno.EINVAL
    assert [w.value for w in ws if w.value.startswith(" ")] == [" online"]
    assert all(w.rc == (0 if w.errno is None else 1) for w in ws)


def test_printf_write(a):
    nonl = [w for w in a.writes() if not w.newline]
    assert len(nonl) == 1
    assert nonl[0].value == "online_movable" and nonl[0].data == b"online_movable" and nonl[0].ok


def test_writes_same_results_in_a_and_b(a, b):
    for wa, wb in zip(a.writes(), b.writes(), strict=True):
        assert (wa.path, wa.value, wa.newline) == (wb.path, wb.value, wb.newline)
        assert (wa.rc, wa.errno, wa.at_open) == (wb.rc, wb.errno, wb.at_open)


# ------------------------------------------------------------------ host steps, waits

def test_host_steps(a, b):
    assert a.host_steps() == b.host_steps()
    hs = a.host_steps()
    assert hs == [
        T.HostAdd("dimm4", 128 * MiB, None, "mem4", "add-dev4"),
        T.HostDel("dimm4", "del-dev4"),
        T.HostAdd("dimm5", 128 * MiB, None, "mem5", "add-dev5"),
        T.HostDel("dimm5", "del-dev5"),
        T.HostDel("dimm3", "del-dev3"),
    ]
    assert hs[0].size == 134217728
    assert sum(1 for tag, q in a.host_requests if q["execute"].startswith("query-")) == 14


def test_waitgone(a):
    wg = a.of_type(T.WaitGone)
    assert [(w.block, w.gone) for w in wg] == [
        ("memory33", True), ("memory32", False), ("memory33", True), ("memory33", True), ("memory34", True)]
    assert wg[1].tenths == 60
    waited = a.of_type(T.Waited)
    assert waited == [T.Waited(17, 18, 1), T.Waited(17, 18, 1)]


def test_failed_eject(a):
    """W59 (eject of PNP0C80:00) returns 0, memory32 stays online, nothing changes."""
    steps = a.steps
    i = next(i for i, s in enumerate(steps) if isinstance(s, T.Write) and s.path.endswith("PNP0C80:00/eject"))
    assert steps[i].ok
    assert isinstance(steps[i + 1], T.WaitGone) and not steps[i + 1].gone
    d21 = a.dump(21)
    assert d21.state("memory32") == "online" and d21.uevents == []
    assert sum("failed due to failure to isolate range" in ln for ln in d21.dmesg) == 3
    assert any("memory memory32: Offline failed." in ln for ln in d21.dmesg)


def test_runtime_add_reuses_hole(a):
    d22, d23 = a.dump(22), a.dump(23)
    assert "memory33" not in d22.blocks
    m33 = d23.blocks["memory33"]
    assert m33["state"] == "offline" and m33["valid_zones"] == "Normal Movable"
    assert m33["firmware_node"].endswith("/PNP0C80:01")
    assert d23.uevent_actions() == [("add", "memory33")]
    assert d23.acpi["PNP0C80:01"]["blocks"] == ["memory33"]


# ------------------------------------------------------------------ uevents, accounting

def test_uevents(a, b):
    for t in (a, b):
        seq = [u["SEQNUM"] for d in t.dumps() for u in d.uevents]
        assert seq == list(range(662, 708))
        for d in t.dumps():
            for u in d.uevents:
                assert set(u) == {"ACTION", "DEVPATH", "SUBSYSTEM", "SEQNUM"}
                assert u["SUBSYSTEM"] == "memory"
        last = t.dumps()[-1].uevent_actions()
        assert last == [("offline", "memory34"), ("offline", "memory36"), ("offline", "memory37")] + [
            ("remove", f"memory{n}") for n in range(34, 42)]
    assert [d.uevents for d in a.dumps()] == [d.uevents for d in b.dumps()]


def test_memmap_on_memory_accounting(a, b):
    # dump 2: memory32 online_movable
    za, zb = a.dump(2).zones["Movable"], b.dump(2).zones["Movable"]
    assert (za["spanned"], za["present"], za["managed"], za["start_pfn"]) == (32768, 32768, 32256, 1048576)
    assert (zb["spanned"], zb["present"], zb["managed"], zb["start_pfn"]) == (32768, 32768, 32768, 1048576)
    assert a.dump(2).mem_total - a.boot.mem_total == 129024
    assert b.dump(2).mem_total - b.boot.mem_total == 131072
    # dump 12: a block of the 1 GiB DIMM: memmap_on_memory not used even in a
    for t in (a, b):
        assert t.dump(12).zones["Movable"]["managed"] == 32768
        assert t.dump(12).mem_total - t.dump(11).mem_total == 131072
    assert any("Offlined Pages 32256" in ln for ln in a.dump(3).dmesg)
    assert any("Offlined Pages 32768" in ln for ln in b.dump(3).dmesg)


def test_block_states_same_in_a_and_b(a, b):
    for da, db in zip(a.dumps(), b.dumps(), strict=True):
        assert da.label == db.label
        sa = {k: (v["state"], v["valid_zones"]) for k, v in da.blocks.items()}
        sb = {k: (v["state"], v["valid_zones"]) for k, v in db.blocks.items()}
        assert sa == sb


# ------------------------------------------------------------------ probe trace, TRACES.md

def test_probe_listing():
    p = T.load_trace("probe")
    ls = p.of_type(T.Listing)
    assert [x.path for x in ls] == [T.MEMORY + "/memory32", T.MEMORY]
    e = ls[0].entries
    assert e["state"]["mode"] == "-rw-r--r--" and e["state"]["size"] == 4096
    assert e["valid_zones"]["mode"] == "-r--r--r--"
    assert e["node0"]["target"] == "../../node/node0"
    assert ls[1].entries["soft_offline_page"]["mode"] == "--w-------"
    assert p.writes() == [] and len(p.dumps()) == 1


def test_traces_md_lists_every_write_of_a(a):
    """TRACES.md's write table must agree with the loader (it was generated from it)."""
    md = Path(__file__).with_name("TRACES.md").read_text()
    rows = [r for r in md.splitlines() if re.match(r"\| W\d\d \|", r)]
    ws = a.writes()
    assert len(rows) == len(ws)
    for row, w in zip(rows, ws):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2].strip("`").split("/")[-1] == w.attr, row
        assert int(cells[4]) == w.rc, row
        errcell = cells[5].replace(" (open)", "")
        assert errcell == (w.errname or "-"), row
        assert ("(open)" in cells[5]) == w.at_open, row
