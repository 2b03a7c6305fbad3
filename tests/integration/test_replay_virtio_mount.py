"""Replay the f_virtio_mem traces end to end through `memfs mount`, with the shell.

The machine is described on the command line as the trace's VM: the embedded default
machine with its ACPI DIMMs replaced by one 2 GiB virtio-mem device
(`--set dimm=[{...driver="virtio_mem"}]`). The host's `qom-set vm0 requested-size N` is
`memfs resize MNT vm0 N`; every write is `echo VALUE > MNT/PATH` run by bash. At every
dump the block files and links, the zone counters of MNT/proc/zoneinfo and MemTotal of
MNT/proc/meminfo must be the kernel's (tests/integration/test_replay_mount.py compare()).
"""
from __future__ import annotations

import os

import pytest

from tests.support.fuse import fuse_unavailable
from tests.integration.test_replay_mount import compare, memfs, shell_write
from tests.conformance.traces import HostResize, Write, load_trace

pytestmark = pytest.mark.skipif(bool(fuse_unavailable()), reason=fuse_unavailable() or "")


@pytest.mark.parametrize("kernel", ["6.1", "6.12", "7.2"])
def test_f_virtio_mem_through_memfs_mount(kernel, tmp_path):
    trace = load_trace("f_virtio_mem", kernel)
    h = trace.header
    (vm,) = trace.cold_virtio_mem
    mnt = os.fspath(tmp_path / "mnt")
    r = memfs("mount", mnt, "--no-sandbox", "--kernel", kernel,
              "--set", f"boot.memmap_on_memory={str(h.memmap_on_memory).lower()}",
              "--set", f"boot.memhp_default_state={h.memhp_default_state}",
              "--set", f'dimm=[{{id = "{vm.id}", size = {vm.size}, driver = "virtio_mem", '
                       f'requested = {vm.requested}}}]')
    assert r.returncode == 0, r.stderr
    problems: list[str] = []
    resized = []
    try:
        for actions, dump in trace.segments():
            for step in actions:
                if isinstance(step, Write):
                    got = shell_write(mnt, step)
                    if got != step.errno:
                        problems.append(f"{step.value!r} > {step.path}: kernel {step.errno}, mount {got}")
                elif isinstance(step, HostResize):
                    p = memfs("resize", mnt, step.device, str(step.requested))
                    assert p.returncode == 0, p.stderr
                    resized.append(p.stdout.split(":", 2)[1].strip())
            problems += [f"dump {dump.step} ({dump.label}): {d}" for d in compare(mnt, dump)]
    finally:
        memfs("umount", mnt)
    assert not problems, "\n".join(problems)
    assert resized == ["requested 512M, plugged 512M", "requested 1G, plugged 1G", "requested 256M, plugged 256M"]
