"""Machine description: sizes, ranges, the embedded default, block_size "auto", refusals.

The block-size rules are arch/x86/mm/init_64.c probe_memory_block_size();
the default machine's numbers are those of the reference trace (Debian 6.1, QEMU -m 1G).
"""
from __future__ import annotations

import copy
import re
import tomllib

import pytest

from memfs.machine.config import (
    ConfigError, default_text, from_dict, load_config, parse_range, parse_size, probe_memory_block_size,
)
from memfs.machine.hotplug import Machine
from memfs.machine.profiles import resolve_kernel

MiB, GiB = 1 << 20, 1 << 30
DEFAULT = tomllib.loads(default_text())


def raw(**top) -> dict:
    """The embedded default as a dict, with top-level keys replaced."""
    d = copy.deepcopy(DEFAULT)
    d.update(top)
    return d


def one_node(ram, **top) -> dict:
    """A machine with one node of boot RAM `ram` and no DIMMs."""
    return raw(node=[{"id": 0, "ram": ram}], dimm=[], **top)


# ---------------------------------------------------------------- sizes and ranges
@pytest.mark.parametrize("text, value", [
    ("128M", 128 * MiB), ("1G", GiB), ("0x8000000", 128 * MiB), ("134217728", 128 * MiB),
    (134217728, 128 * MiB), (0, 0), ("4K", 4096), ("2T", 2 << 40), ("1g", GiB), ("512MiB", 512 * MiB),
    ("0X40000000", GiB), (" 64M ", 64 * MiB),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "M", "12Q", "0x", "1.5G", "-1", -1, True, False, None, 1.0, [1], "0xZZ"])
def test_parse_size_refuses_with_the_key(bad):
    with pytest.raises(ConfigError, match="^dimm.size: "):
        parse_size(bad, "dimm.size")


def test_parse_range():
    assert parse_range("0x1000-0x9f000", "ram") == (0x1000, 0x9f000)
    assert parse_range("1G-2G", "ram") == (GiB, 2 * GiB)
    for bad in ("0x1000", "0x2000-0x1000", "0x1000-0x1000", "a-b", 5, None):
        with pytest.raises(ConfigError, match="^node.ram: "):
            parse_range(bad, "node.ram")


# ---------------------------------------------------------------- the embedded default
def test_default_config_is_the_reference_vm():
    cfg = load_config(None)
    assert (cfg.kernel, cfg.arch, cfg.block_size, cfg.struct_page_size) == ("6.1", "x86_64", 128 * MiB, 64)
    assert cfg.boot.memmap_on_memory is True and cfg.boot.memhp_default_state == "offline"
    assert [(d.id, d.size) for d in cfg.dimms] == [("dimm1", 128 * MiB), ("dimm2", 128 * MiB), ("dimm3", GiB)]
    assert cfg.nodes[0].ram == [(0x1000, 0x9f000), (0x100000, 0x3ffe0000)]


def test_default_machine_boot_zones_and_memtotal():
    m = Machine(load_config(None))
    dma, dma32, normal, movable = (m.nodes[0].zone(n) for n in ("DMA", "DMA32", "Normal", "Movable"))
    assert (dma.start_pfn, dma.spanned, dma.present, dma.managed) == (1, 4095, 3998, 3840)
    assert (dma32.start_pfn, dma32.spanned, dma32.present, dma32.managed) == (4096, 258016, 258016, 225015)
    assert normal.spanned == normal.present == movable.spanned == movable.present == 0
    assert m.meminfo()["MemTotal"] == 915420
    # boot blocks memory0..7 online, cold-plugged DIMMs memory32..41 offline
    assert sorted(m.blocks) == list(range(8)) + list(range(32, 42))
    assert all(m.blocks[b].state == "online" for b in range(8))
    assert all(m.blocks[b].state == "offline" for b in range(32, 42))


# ---------------------------------------------------------------- block_size "auto"
@pytest.mark.parametrize("end, hypervisor, expect", [
    ("0x40000000", True, 128 * MiB),        # 1 GiB VM
    ("0xfc0000000", True, 128 * MiB),       # 63 GiB: still below 64 GiB
    ("0x1000000000", True, 2 * GiB),        # exactly 64 GiB: not below, 2 GiB aligned
    ("0x1080000000", True, 2 * GiB),        # 66 GiB VM
    ("0x10c0000000", True, GiB),            # 67 GiB VM: largest power of two dividing the end
    ("0x10c8000000", True, 128 * MiB),      # 67 GiB + 128 MiB: only 128 MiB divides it
    ("0x10c0000000", False, 2 * GiB),       # bare metal: 2 GiB whatever the alignment
    ("0x40000000", False, 128 * MiB),       # bare metal below 64 GiB: 128 MiB
])
def test_x86_probe_memory_block_size(end, hypervisor, expect):
    d = one_node([f"0x100000-{end}"], hypervisor=hypervisor, hotplug={"base": "128G", "size": "16G", "slots": 8})
    cfg = from_dict(d)
    assert cfg.block_size == expect
    assert probe_memory_block_size(cfg) == expect


def test_block_size_auto_arm64_is_the_section_size():
    d = one_node(["0x40000000-0x80000000"], arch="arm64-64k")
    assert from_dict(d).block_size == 512 * MiB
    d = one_node(["0x40000000-0x80000000"], arch="arm64-4k")
    assert from_dict(d).block_size == 128 * MiB
    d = one_node(["0x40000000-0x80000000"], arch="arm64-16k")
    assert from_dict(d).block_size == 128 * MiB


def test_block_size_explicit():
    assert from_dict(raw(block_size="256M", dimm=[])).block_size == 256 * MiB
    assert from_dict(raw(block_size=0x8000000)).block_size == 128 * MiB
    for bad in ("64M", "192M"):  # below the section size; not a power of two
        with pytest.raises(ConfigError, match="^block_size: "):
            from_dict(raw(block_size=bad))


# ---------------------------------------------------------------- refusals, each naming its key
@pytest.mark.parametrize("mutate, key", [
    (lambda d: d.update(colour="red"), "colour"),
    (lambda d: d["boot"].update(memmap_on_memroy=True), "boot.memmap_on_memroy"),
    (lambda d: d["node"][0].update(size="1G"), "node[0].size"),
    (lambda d: d["dimm"][0].update(bus=3), "dimm[0].bus"),
    (lambda d: d["hotplug"].update(maxmem="16G"), "hotplug.maxmem"),
])
def test_unknown_keys_are_refused(mutate, key):
    d = raw()
    mutate(d)
    with pytest.raises(ConfigError) as ei:
        from_dict(d)
    msg = str(ei.value)
    assert msg.startswith(f"{key}: unknown key")


def test_overlapping_node_ranges_refused():
    d = raw(node=[{"id": 0, "ram": ["0x100000-0x40000000"]}, {"id": 1, "ram": ["0x3f000000-0x80000000"]}],
            dimm=[])
    with pytest.raises(ConfigError, match="overlaps"):
        from_dict(d)


def test_dimm_overlapping_boot_ram_or_another_dimm_refused():
    d = raw(dimm=[{"id": "d1", "size": "128M", "addr": "0x38000000"}])
    with pytest.raises(ConfigError, match="dimm 'd1' overlaps node 0 ram"):
        from_dict(d)
    d = raw(dimm=[{"id": "d1", "size": "256M", "addr": "4G"}, {"id": "d2", "size": "128M", "addr": "0x108000000"}])
    with pytest.raises(ConfigError, match="dimm 'd2' overlaps dimm 'd1'"):
        from_dict(d)
    # adjacent is fine
    d = raw(dimm=[{"id": "d1", "size": "256M", "addr": "4G"}, {"id": "d2", "size": "128M", "addr": "0x110000000"}])
    assert [x.addr for x in from_dict(d).dimms] == [4 * GiB, 4 * GiB + 256 * MiB]


def test_unaligned_dimm_addr_refused():
    d = raw(dimm=[{"id": "d1", "size": "128M", "addr": "0x104000000"}])
    with pytest.raises(ConfigError, match=r"dimm 'd1': addr 0x104000000 is not aligned"):
        from_dict(d)


@pytest.mark.parametrize("size", ["64M", "192M", 0])
def test_dimm_size_not_a_block_multiple_refused(size):
    d = raw(dimm=[{"id": "d1", "size": size}])
    with pytest.raises(ConfigError, match=r"dimm 'd1': size .* not a multiple of the block size"):
        from_dict(d)


def test_dimm_without_size_or_on_unknown_node_refused():
    with pytest.raises(ConfigError, match=r"^dimm\[0\].size: "):
        from_dict(raw(dimm=[{"id": "d1"}]))
    with pytest.raises(ConfigError, match=r"dimm 'd1': node 3 "):
        from_dict(raw(dimm=[{"id": "d1", "size": "128M", "node": 3}]))


@pytest.mark.parametrize("kernel", ["5.12", "5.13", "5.15", "6.1"])
def test_force_needs_a_6_6_profile(kernel):
    d = raw(kernel=kernel)
    d["boot"]["memmap_on_memory"] = "force"
    with pytest.raises(ConfigError, match=r"^boot.memmap_on_memory: \"force\" needs a 6.6\+"):
        from_dict(d)


@pytest.mark.parametrize("kernel", ["6.6", "6.8", "6.12", "6.19"])
def test_force_accepted_from_6_6(kernel):
    d = raw(kernel=kernel)
    d["boot"]["memmap_on_memory"] = "force"
    assert from_dict(d).boot.memmap_on_memory == "force"


def test_unknown_kernel_and_arch_refused():
    with pytest.raises(ConfigError, match=r"^kernel: 4.19 is older than the oldest profile \(5.12\)"):
        from_dict(raw(kernel="4.19"))
    with pytest.raises(ConfigError, match=r"^kernel: unknown profile 'linus'; give a profile \(5.12, "):
        from_dict(raw(kernel="linus"))
    with pytest.raises(ConfigError, match=r"^arch: unknown 'riscv64'"):
        from_dict(raw(arch="riscv64"))


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d.update(hypervisor="yes"), "hypervisor"),
    (lambda d: d.update(probe=1), "probe"),
    (lambda d: d["boot"].update(memmap_on_memory="on"), "boot.memmap_on_memory"),
    (lambda d: d["boot"].update(movable_node=0), "boot.movable_node"),
    (lambda d: d["boot"].update(auto_movable_numa_aware="Y"), "boot.auto_movable_numa_aware"),
    (lambda d: d["node"][0].update(cpus="true"), "node[0].cpus"),
])
def test_bad_bools_refused(mutate, key):
    d = raw()
    mutate(d)
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ": expected true or false"):
        from_dict(d)


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d["boot"].update(memhp_default_state="online_normal"), "boot.memhp_default_state"),
    (lambda d: d["boot"].update(online_policy="auto_movable"), "boot.online_policy"),
    (lambda d: d["boot"].update(auto_movable_ratio=-1), "boot.auto_movable_ratio"),
    (lambda d: d["dimm"][0].update(driver="ibm"), r"dimm\[0\].driver"),
    (lambda d: d["hotplug"].update(slots=300), "hotplug.slots"),
    (lambda d: d["hotplug"].update(size="100M"), "hotplug"),
    (lambda d: d.update(struct_page_size=0), "struct_page_size"),
    (lambda d: d.update(node=[]), "node"),
    (lambda d: d["node"][0].pop("id"), r"node\[0\].id"),
    (lambda d: d["node"][0].update(ram=["0x1001-0x9f000"]), r"node\[0\].ram"),
    (lambda d: d["node"][0].update(reserved="2G"), r"node\[0\]"),
])
def test_other_refusals_name_their_key(mutate, key):
    d = raw()
    mutate(d)
    with pytest.raises(ConfigError, match=rf"^{key}[:\. ]"):
        from_dict(d)


def test_duplicate_ids_refused():
    with pytest.raises(ConfigError, match=r"^node.id: "):
        from_dict(raw(node=[{"id": 0, "ram": ["0x100000-0x40000000"]}, {"id": 0}], dimm=[]))
    with pytest.raises(ConfigError, match=r"dimm 'a': duplicate id"):
        from_dict(raw(dimm=[{"id": "a", "size": "128M"}, {"id": "a", "size": "128M"}]))


def test_too_many_acpi_dimms_for_the_slots():
    d = raw(hotplug={"base": "4G", "size": "23G", "slots": 2})
    with pytest.raises(ConfigError, match=r"^hotplug.slots: 2 slots"):
        from_dict(d)


def test_overrides_and_kernel_argument():
    cfg = load_config(None, overrides={"boot.memmap_on_memory": False, "dimm": []}, kernel="6.12")
    assert cfg.kernel == "6.12" and cfg.boot.memmap_on_memory is False and cfg.dimms == []


def test_invalid_toml_names_the_file(tmp_path):
    p = tmp_path / "m.toml"
    p.write_text("kernel = \n")
    with pytest.raises(ConfigError, match=rf"^{p}: not valid TOML"):
        load_config(p)


@pytest.mark.parametrize("text, profile, note", [
    ("6.12", "6.12", None),
    ("6.12.117+deb13-amd64", "6.12", "kernel 6.12.117+deb13-amd64: profile 6.12 (exact release line)"),
    ("7.2.13", "7.2", "kernel 7.2.13: profile 7.2 (exact release line)"),
    ("6.1.0-56-amd64", "6.1", "kernel 6.1.0-56-amd64: profile 6.1 (exact release line)"),
    ("6.10.3", "6.8", "kernel 6.10.3: profile 6.8 (newest profile not newer than 6.10)"),
    ("7.0.1-arch1-1", "6.19", "kernel 7.0.1-arch1-1: profile 6.19 (newest profile not newer than 7.0)"),
    ("8.1", "7.2", "kernel 8.1: profile 7.2 (newest profile not newer than 8.1)"),
])
def test_release_strings_pick_the_covering_profile(text, profile, note):
    assert resolve_kernel(text) == (profile, note)
    assert from_dict(raw(kernel=text)).kernel == profile


@pytest.mark.parametrize("kernel, total_kb, dma32_managed, free_kb", [
    ("6.1", 915420, 225015, 862312),   # tests/conformance/data/*/a_memmap_on: the boot dump
    ("6.12", 922260, 226725, 891920),
    ("7.2", 918008, 225662, 880652),
])
def test_default_machine_boots_with_the_builds_numbers(kernel, total_kb, dma32_managed, free_kb):
    m = Machine(load_config(None, kernel=kernel))
    zones = m.nodes[0]
    assert (zones.zone("DMA").managed, zones.zone("DMA32").managed) == (3840, dma32_managed)
    assert (m.meminfo()["MemTotal"], m.meminfo()["MemFree"]) == (total_kb, free_kb)


def test_auto_boot_numbers_scale_with_the_boot_memmap():
    """"auto" reserves the memmap of every boot section (2 MiB per 128 MiB) plus the build's
    early reservations on the first node with RAM only."""
    d = raw(kernel="6.12")
    d["node"] = [{"id": 0, "ram": ["0-0x80000000"], "reserved": "auto", "used": "auto"},
                 {"id": 1, "ram": ["0x100000000-0x140000000"], "reserved": "auto", "used": "auto"}]
    d.pop("dimm", None)
    cfg = from_dict(d)
    assert [n.reserved // 4096 for n in cfg.nodes] == [16 * 512 + 27195, 8 * 512]
    assert [n.used // 4096 for n in cfg.nodes] == [7585, 0]
