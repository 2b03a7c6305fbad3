"""Boot layouts through a real mount and the CLI: the hotplug window on an 8 TiB machine,
and `memfs plug` of an ACPI DIMM on Debian's arm64 kernel (no ACPI memory hotplug)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from memfs.pytest_plugin import fuse_unavailable

pytestmark = [
    pytest.mark.skipif(fuse_unavailable() is not None, reason=fuse_unavailable() or ""),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (allow_other)"),
]

HERE = Path(__file__).resolve().parent
ARM64 = HERE.parent / "conformance" / "machines" / "arm64-virt-6.1.toml"
TiB, GiB = 1 << 40, 1 << 30


def test_plug_on_an_8_tib_machine(memfs_mount):
    m = memfs_mount(config=HERE / "machines" / "x86-8tib.toml")
    s = m.status()
    assert (s["block_size"], s["hotplug"]["base"]) == (GiB, 8 * TiB + GiB)
    r = m.cli("plug", "--size", "2G")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "dimm1: memory8193 (offline) memory8194 (offline)\n"
    assert (m.memory / "memory8194/phys_index").read_text() == "00002002\n"
    (m.memory / "memory8193/state").write_text("online_movable")
    assert (m.memory / "memory8193/valid_zones").read_text() == "Movable\n"


def test_acpi_dimm_on_debian_arm64_gives_no_memory(memfs_mount):
    m = memfs_mount(config=ARM64)
    r = m.cli("plug", "--size", "128M", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["device"]["id"] == "dimm1" and out["blocks"] == []
    r = m.cli("plug", "--size", "128M")
    assert r.returncode == 0 and r.stdout == "dimm2: (no memory blocks)\n"
    assert "no ACPI memory hotplug (CONFIG_ACPI_HOTPLUG_MEMORY is not set" in r.stderr
    assert "--driver virtio_mem" in r.stderr
    assert (m.path / "sys/bus/acpi/devices/PNP0C80:01/status").read_text() == "15\n"
    assert max(int(n[6:]) for n in os.listdir(m.memory) if n.startswith("memory") and n[6:].isdigit()) == 15
    r = m.cli("plug", "--size", "128M", "--driver", "virtio_mem")
    assert r.returncode == 0 and r.stdout == "virtio_mem1: memory18 (offline)\n", r.stdout + r.stderr
    assert m.cli("unplug", "dimm2").returncode == 0
    assert (m.path / "sys/bus/acpi/devices/PNP0C80:01/status").read_text() == "0\n"
