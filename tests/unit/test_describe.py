"""memfs describe on dumps the tests build from memfs machines (no FUSE here; the round
trip through real mounts and lsmem is tests/integration/test_describe_roundtrip.py).

Each dump is a memfs machine after writes a user or udev would make; its description,
booted again, must read the same in every memory block attribute and node link, and
show the same MemTotal and MemFree.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from memfs.cli import main
from memfs.describe import describe, profile_for_release
from memfs.machine.config import from_dict
from memfs.machine.hotplug import Machine
from memfs.sysfs.tree import build_tree
from tests.support.sysdump import CONFORMANCE, attribute_files, dump_from_trace, dump_tree, trace_dumps
from tests.support.sysroot import MEM, Sysroot, machine

MiB, GiB = 1 << 20, 1 << 30


def iomem(m: Machine) -> str:
    """/proc/iomem's RAM lines as kernel/resource.c prints them for this machine: boot RAM
    and ACPI/probe memory top-level "System RAM"; dax/kmem and virtio-mem memory nested
    under their device's region (drivers/dax/kmem.c, drivers/virtio/virtio_mem.c)."""
    lines = []
    for n in m.cfg.nodes:
        lines += [(s, e, "System RAM", None) for s, e in n.ram]
    for d in m.devices.values():
        if d.driver in ("acpi", "probe"):
            lines.append((d.start, d.start + d.size, "System RAM", None))
        else:
            parent = "dax0.0" if d.driver == "dax_kmem" else "virtio0"
            label = "System RAM (kmem)" if d.driver == "dax_kmem" else "System RAM (virtio_mem)"
            lines.append((d.start, d.start + d.size, parent, label))
    out = []
    for s, e, name, child in sorted(lines):
        out.append(f"{s:08x}-{e - 1:08x} : {name}")
        if child:
            out.append(f"  {s:08x}-{e - 1:08x} : {child}")
    return "\n".join(out) + "\n"


def roundtrip(tmp_path: Path, m: Machine, release: str, arch: str = "x86_64", with_iomem: bool = True):
    src = tmp_path / "src"
    dump_tree(build_tree(m), src, release=release, arch=arch, iomem=iomem(m) if with_iomem else None)
    d = describe(src)
    replica = Machine(from_dict(tomllib.loads(d.text)))
    out = tmp_path / "replica"
    dump_tree(build_tree(replica), out)
    return d, replica, attribute_files(src), attribute_files(out)


def writes(m: Machine, *pairs: tuple[str, str]) -> Machine:
    s = Sysroot(m)
    for bids, word in pairs:
        a, _, b = bids.partition("-")
        for bid in range(int(a), int(b or a) + 1):
            assert s.write(f"{MEM}/memory{bid}/state", word.encode()) is None, (bid, word)
    return m


def meminfo(m: Machine) -> dict[str, int]:
    return {k: v for k, v in m.meminfo().items() if k in ("MemTotal", "MemFree")}


SCENARIOS = {
    # the reference VM: movable and kernel DIMM blocks, boot blocks taken offline
    "6.1-dimms": lambda: (writes(machine("6.1"), ("32", "online_movable"), ("33", "online_kernel"),
                                 ("34-41", "online_movable"), ("2-4", "offline")), "6.1.0-56-amd64", "x86_64"),
    # auto-onlined (movable) DIMMs, one more hot-added at run time, one block offline again
    "6.8-auto-movable": lambda: (_plugged(machine("6.8", **{"boot.memhp_default_state": "online_movable"}),
                                          "256M", "acpi", offline=(43,)), "6.8.0-1-amd64", "x86_64"),
    # memmap_on_memory=force, a dax/kmem device with its own memmap, online movable
    "6.12-force-kmem": lambda: (writes(_plugged(machine("6.12", **{"boot.memmap_on_memory": "force"}), "512M",
                                                "dax_kmem", memmap=True), ("42-45", "online_movable")),
                                "6.12.9-amd64", "x86_64"),
    # virtio-mem on a 6.19 kernel, auto-movable policy: zones follow the ratio
    "6.19-virtio-auto-movable": lambda: (_plugged(machine("6.19", **{"boot.online_policy": "auto-movable",
                                                                      "boot.memhp_default_state": "online"}),
                                                  "1G", "virtio_mem"), "6.19.0", "x86_64"),
    # a memory-less node 1 (no CPUs, SLIT distance 21) that gets memory by hot-add
    "6.1-memoryless-node": lambda: (_two_nodes(), "6.1.0-56-amd64", "x86_64"),
    # arm64, RAM at 1 GiB (QEMU virt): a virtio-mem device at 2 GiB (memory16-19), half online
    "arm64-virt": lambda: (writes(_plugged(Machine(from_dict({
        "kernel": "6.1", "arch": "arm64-4k", "hotplug": {"slots": 0},
        "node": [{"id": 0, "ram": ["0x40000000-0x80000000"], "reserved": 64 * MiB, "used": 40 * MiB}]})),
        "512M", "virtio_mem"), ("17-18", "online_movable")), "6.1.0-27-arm64", "aarch64"),
    # 5.12: no memory_hotplug parameters, zones not cached per block
    "5.12-old": lambda: (writes(machine("5.12"), ("32-33", "online"), ("34-41", "online_movable")),
                         "5.12.0", "x86_64"),
}


def _plugged(m: Machine, size: str, driver: str, memmap: bool = False, offline: tuple[int, ...] = ()) -> Machine:
    from memfs.machine.config import parse_size
    m.plug(parse_size(size), driver=driver, memmap_on_memory=memmap)
    return writes(m, *((str(b), "offline") for b in offline))


def _two_nodes() -> Machine:
    m = Machine(from_dict({
        "kernel": "6.1", "node": [{"id": 0, "ram": ["0x100000-0x40000000"], "cpus": "0-3", "distance": [10, 21]},
                                  {"id": 1, "ram": [], "cpus": False, "distance": [21, 10]}]}))
    m.plug(256 * MiB, node=1, driver="acpi")
    return writes(m, ("32", "online_movable"), ("33", "online_kernel"))


@pytest.mark.parametrize("name", SCENARIOS)
def test_memfs_machines_come_back_the_same(tmp_path, name):
    m, release, arch = SCENARIOS[name]()
    d, replica, want, got = roundtrip(tmp_path, m, release, arch)
    assert d.differences == []
    assert {k: got.get(k) for k in want} == want  # every file of the source reads the same
    assert len(want) > 8 * len(m.blocks)  # the dump really has every block's files and links
    assert meminfo(replica) == meminfo(m)
    assert {b.id: (b.device.driver if b.device else None) for b in replica.blocks.values()} == \
        {b.id: (b.device.driver if b.device else None) for b in m.blocks.values()}


def test_the_description_names_what_it_found(tmp_path):
    m, release, arch = SCENARIOS["6.1-dimms"]()
    d, replica, _, _ = roundtrip(tmp_path, m, release, arch)
    raw = tomllib.loads(d.text)
    assert (raw["kernel"], raw["arch"], raw["block_size"]) == ("6.1", "x86_64", "128M")
    assert raw["node"][0]["ram"] == ["0x1000-0x9f000", "0x100000-0x3ffe0000"]  # from proc/iomem
    assert [(x["id"], x["addr"], x["size"], x["driver"]) for x in raw["dimm"]] == [
        ("dimm1", "0x100000000", "128M", "acpi"), ("dimm2", "0x108000000", "128M", "acpi"),
        ("dimm3", "0x110000000", "1G", "acpi")]
    assert raw["state"] == [
        {"blocks": "2-4", "state": "offline"},
        {"blocks": "32", "state": "online_movable", "zone": "Movable"},
        {"blocks": "33", "state": "online_kernel", "zone": "Normal"},
        {"blocks": "34-41", "state": "online_movable", "zone": "Movable"}]
    assert raw["node"][0]["reserved"] == m.cfg.nodes[0].reserved  # calibrated against zoneinfo
    assert raw["node"][0]["used"] == m.cfg.nodes[0].used  # and node meminfo
    assert "# - which pages are unmovable" in d.text


def test_without_iomem_boot_ram_is_whole_blocks_and_devices_are_acpi_only(tmp_path):
    m, release, arch = SCENARIOS["6.1-dimms"]()
    d, replica, want, got = roundtrip(tmp_path, m, release, arch, with_iomem=False)
    assert tomllib.loads(d.text)["node"][0]["ram"] == ["0x1000-0x40000000"]
    assert "boot RAM from the memory blocks" in d.text
    assert {k: got.get(k) for k in want} == want and d.differences == []


def test_pre_5_7_removable_is_reported_not_guessed(tmp_path):
    m = machine("5.12")
    src = tmp_path / "src"
    dump_tree(build_tree(m), src, release="4.19.0", arch="x86_64")
    (src / MEM.lstrip("/") / "memory5" / "removable").write_text("0\n")
    d = describe(src)
    assert "note: `removable` reads 0 for memory5: kernels before 5.7 computed it per block" in d.text
    assert "note: 4.19.0 is older than memfs's oldest profile (5.12)" in d.text
    assert d.differences == ["memory5/removable: '0' here, '1' in memfs"]
    assert "#   memory5/removable: '0' here, '1' in memfs" in d.text


@pytest.mark.parametrize("release, profile, note", [
    ("6.1.0-56-amd64", "6.1", "profile 6.1 (exact release line)"),
    ("6.18.44-fc-v782", "6.12", "profile 6.12 (newest profile not newer than 6.18)"),
    ("6.8.0-49-generic", "6.8", "exact release line"), ("5.10.0-30-amd64", "5.12", "older than memfs's oldest profile"),
    ("7.3.1", "7.2", "profile 7.2 (newest profile not newer than 7.3)"),
])
def test_profile_from_the_release(release, profile, note):
    got, why = profile_for_release(release)
    assert got == profile
    assert note in why


def test_kernel_option_overrides_the_release(tmp_path):
    src = tmp_path / "src"
    dump_tree(build_tree(machine("6.1")), src, release="6.1.0-56-amd64", arch="x86_64")
    assert tomllib.loads(describe(src, kernel="6.8").text)["kernel"] == "6.8"


def test_cli_errors_say_what_to_do(tmp_path, capsys):
    assert main(["describe", "--sysroot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"memfs: {tmp_path}/sys/devices/system/memory/block_size_bytes is missing: {tmp_path} is not a sysroot "
        f"with memory blocks (expected sys/devices/system/memory/memoryN, as /sys or a dump of it)\n")
    src = tmp_path / "s390"
    dump_tree(build_tree(machine("6.1")), src, release="6.1.0", arch="s390x")
    assert main(["describe", "--sysroot", str(src)]) == 2
    assert capsys.readouterr().err == "memfs: the machine is s390x; memfs models x86_64 and arm64 only " \
                                      "(x86_64, arm64-4k, arm64-16k, arm64-64k)\n"
    src = tmp_path / "x86"
    dump_tree(build_tree(machine("6.1")), src, release="6.1.0", arch="x86_64")
    assert main(["describe", "--sysroot", str(src), "--kernel", "4.9"]) == 2
    assert capsys.readouterr().err.startswith("memfs: --kernel: 4.9 is older than the oldest profile (5.12)")


def test_cli_writes_the_file_it_is_given(tmp_path, capsys):
    src = tmp_path / "src"
    dump_tree(build_tree(machine("6.1")), src, release="6.1.0-56-amd64", arch="x86_64")
    out = tmp_path / "m.toml"
    assert main(["describe", "--sysroot", str(src), "-o", str(out)]) == 0
    assert capsys.readouterr() == ("", "")
    assert out.read_text() == describe(src).text
    assert main(["describe", "--sysroot", str(src)]) == 0
    assert capsys.readouterr().out == out.read_text()


# ---------------------------------------------------------------- dumps of real kernels
TRACES = [(k.name, s.name) for k in sorted(CONFORMANCE.iterdir()) if k.is_dir()
          for s in sorted(k.iterdir()) if s.is_dir()]


@pytest.mark.parametrize("kernel, scenario", TRACES)
def test_every_dump_of_a_real_kernel_comes_back_the_same(tmp_path, kernel, scenario):
    """Each dump a real kernel's guest wrote (tests/conformance/data: Debian 6.1, 6.12, 7.2 on
    QEMU pc, 6.1 on arm64 virt; ACPI DIMMs in and out of their slots, virtio-mem, memmap_on_memory
    on, off and force, blocks in every zone) is described; booted again, the description reads
    the same in every block attribute, node link and node MemTotal/MemFree/MemUsed."""
    header, dumps = trace_dumps(kernel, scenario)
    assert dumps
    for d in dumps:
        src, out = tmp_path / f"{d['step']}-src", tmp_path / f"{d['step']}-replica"
        dump_from_trace(header, d, src)
        desc = describe(src)
        assert desc.differences == [], (d["step"], d["label"])
        dump_tree(build_tree(Machine(from_dict(tomllib.loads(desc.text)))), out)
        want = attribute_files(src)
        got = attribute_files(out)
        assert {k: got.get(k) for k in want} == want, (d["step"], d["label"])
        assert any(k.endswith("/valid_zones") for k in want) and any(k.endswith("/meminfo") for k in want)


def test_arm64_firmware_memory_is_described_as_nomap(tmp_path):
    """QEMU virt's second flash bank (memory0) and the EFI regions inside RAM are present in
    ZONE_DMA but not System RAM: nomap, so memory0 exists and offlining it fails for holes."""
    header, dumps = trace_dumps("arm64-6.1", "a_memmap_on")
    dump_from_trace(header, dumps[0], tmp_path)
    raw = tomllib.loads(describe(tmp_path).text)
    assert (raw["kernel"], raw["arch"]) == ("6.1", "arm64-4k")
    assert raw["node"][0]["ram"] == ["0x40000000-0x7c440000", "0x7c730000-0x7fc00000", "0x7ffe0000-0x80000000"]
    assert raw["node"][0]["nomap"] == ["0x4000000-0x8000000", "0x7c440000-0x7c730000", "0x7fc00000-0x7ffe0000"]


def test_arch_option_for_dumps_that_do_not_say(tmp_path):
    m, release, _ = SCENARIOS["arm64-virt"]()
    dump_tree(build_tree(m), tmp_path, release=release, iomem=iomem(m))  # no proc/sys/kernel/arch
    guessed = describe(tmp_path)
    assert "note: the dump has no proc/sys/kernel/arch: x86_64 assumed; give --arch to choose" in guessed.text
    assert guessed.differences  # an arm64 machine does not come out as x86_64
    told = describe(tmp_path, arch="arm64-4k")
    assert (tomllib.loads(told.text)["arch"], told.differences) == ("arm64-4k", [])


def test_a_state_memfs_refuses_is_left_out_and_said(tmp_path):
    src = tmp_path / "src"
    dump_tree(build_tree(machine("6.1")), src, release="6.1.0-56-amd64", arch="x86_64")
    (src / MEM.lstrip("/") / "memory0" / "state").write_text("offline\n")  # memfs cannot offline it
    (src / MEM.lstrip("/") / "memory0" / "online").write_text("0\n")
    d = describe(src)
    assert "note: left out [[state]] blocks = '0', state = 'offline': state[0]: writing offline to " \
           "memory0/state fails (EINVAL: memory0 spans multiple zones)" in d.text
    assert d.differences == ["memory0/state: 'offline' here, 'online' in memfs",
                             "memory0/online: '0' here, '1' in memfs"]
    Machine(from_dict(tomllib.loads(d.text)))  # the description boots
