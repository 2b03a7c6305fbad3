"""README.md and docs/ stay truthful about what the code says: kernel profiles, commands, config keys."""
from __future__ import annotations

import re
from pathlib import Path

from memfs.cli import build_parser
from memfs.machine import config
from memfs.machine.profiles import PROFILES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CLI_DOC = (ROOT / "docs" / "cli.md").read_text()
MACHINE_DOC = (ROOT / "docs" / "machine.md").read_text()

# docs/machine.md column -> KernelProfile field
PROFILE_COLUMNS = ["memmap_on_memory", "memmap_force", "memmap_split_per_block", "acpi_always_requests",
                   "dax_kmem_memmap", "online_policy", "cached_zone", "hwpoison_online", "vmstat_memmap",
                   "crash_hotplug", "toggles_normal_memory", "mf_stats", "acpi_container_online",
                   "virtio_mem_movable_first"]


def test_quick_start_is_two_commands():
    block = README.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    assert [ln.split("#")[0].strip() for ln in block.strip().splitlines()] == ["./scripts/run", "./scripts/test"]


def test_profile_table_matches_profiles():
    section = MACHINE_DOC.split("## Kernel profiles", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if re.match(r"\| \d", ln)]
    seen = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        name = cells[0].split()[0]
        seen.append(name)
        flags = [c == "yes" for c in cells[1:]]
        assert flags == [getattr(PROFILES[name], f) for f in PROFILE_COLUMNS], name
    assert seen == list(PROFILES)


def test_every_command_is_documented():
    """One line per command in the README, the whole story in docs/cli.md."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    readme = README.split("## Commands", 1)[1].split("\n## ", 1)[0]
    for name in sub.choices:
        for where, section in (("README.md", readme), ("docs/cli.md", CLI_DOC)):
            assert f"`memfs {name} " in section or f"`memfs {name}`" in section, (where, name)


def test_readme_links_resolve():
    for target in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / target).is_file(), target


def test_every_config_key_is_documented():
    section = MACHINE_DOC.split("## The machine description", 1)[1].split("\n## ", 1)[0]
    keys = (config._TOP_KEYS - {"hotplug", "boot", "node", "dimm"}) | {f"[hotplug] {k}" for k in config._HOTPLUG_KEYS} \
        | {f"[boot] {k}" for k in config._BOOT_KEYS} | {f"[[node]] {k}" for k in config._NODE_KEYS} \
        | {f"[[dimm]] {k}" for k in config._DIMM_KEYS}
    for key in keys:
        table, _, name = key.rpartition(" ")
        assert re.search(rf"`{re.escape(table + ' ' if table else '')}[^`]*\b{name}\b", section), key
