"""The round trip through real mounts: ``memfs describe --sysroot D`` then ``memfs mount MNT
--config`` that file serves a tree on which lsmem prints what it prints on D, for every
option set of util-linux's lsmem test, and every memory block attribute reads the same.

Dumps come from memfs machines (mounted, changed by writes through the mount and by
hot-add, then copied) and from this machine's own /sys (copied read-only). ``describe``
of the live machine must write nothing anywhere but its output file: checked with strace.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from memfs.pytest_plugin import memfs_cli
from tests.support.sysdump import LSMEM_OPTION_SETS, attribute_files, copy_sysroot, dump_from_trace, trace_dumps

pytestmark = pytest.mark.skipif(shutil.which("lsmem") is None, reason="lsmem (util-linux) is not installed")

MEMORYLESS_NODE1 = """
kernel = "6.12"
[hotplug]
slots = 4
[boot]
memhp_default_state = "online"
[[node]]
id = 0
ram = ["0x1000-0x9f000", "0x100000-0x80000000"]
reserved = "96M"
used = "40M"
[[node]]
id = 1
cpus = false
"""

# (kernel, --set, a description file, writes to memoryN/state, control ops before the writes)
SOURCES = {
    "6.1-reference-vm": ("6.1", {}, None,
                         [("32", "online_movable"), ("33", "online_kernel"), ("34-41", "online_movable"),
                          ("2-4", "offline"), ("42", "online")],
                         [{"op": "plug", "size": "256M"}]),
    "6.12-memoryless-node": (None, {}, MEMORYLESS_NODE1,
                             [("33", "offline"), ("33", "online_movable"), ("5", "offline")],
                             [{"op": "plug", "size": "512M", "node": 1}, {"op": "plug", "size": "128M"}]),
    "5.12-no-parameters": ("5.12", {"boot.memhp_default_state": "online"}, None, [("33", "offline")], []),
}


def lsmem(sysroot: Path | None, *opts: str) -> str:
    argv = ["lsmem", *opts] + (["--sysroot", str(sysroot)] if sysroot is not None else [])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def check_roundtrip(memfs_mount, dump: Path, tmp_path: Path, live: bool = False) -> None:
    out = tmp_path / "machine.toml"
    r = memfs_cli("describe", "--sysroot", str(dump), "-o", str(out))
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    replica = memfs_mount(config=out, extra=("--no-sandbox",))
    for opts in LSMEM_OPTION_SETS:
        want = lsmem(dump, *opts)
        assert lsmem(replica.path, *opts) == want, opts
        if live:
            assert lsmem(None, *opts) == want, opts  # the copy is the live machine's
    want, got = attribute_files(dump), attribute_files(replica.path)
    assert len(want) > 8 * len([k for k in want if k.endswith("/state")])
    assert {k: got.get(k) for k in want} == want  # every file of the source reads the same


@pytest.mark.parametrize("name", SOURCES)
def test_memfs_machines_round_trip(memfs_mount, tmp_path, name):
    kernel, sets, text, writes, ops = SOURCES[name]
    config = None
    if text is not None:
        config = tmp_path / "source.toml"
        config.write_text(text)
    src = memfs_mount(config=config, kernel=kernel, sets=sets, extra=("--no-sandbox",))
    for op in ops:
        src.call(op.pop("op"), **op)
    for bids, word in writes:
        a, _, b = bids.partition("-")
        for bid in range(int(a), int(b or a) + 1):
            (src.memory / f"memory{bid}" / "state").write_text(word)
    dump = tmp_path / "dump"
    assert copy_sysroot(src.path, dump) > 0
    (dump / "proc/sys/kernel").mkdir(parents=True)
    (dump / "proc/sys/kernel/osrelease").write_text(f"{src.status()['kernel']}.0-test\n")
    (dump / "proc/sys/kernel/arch").write_text("x86_64\n")
    check_roundtrip(memfs_mount, dump, tmp_path)


@pytest.mark.parametrize("kernel, scenario, step", [
    ("6.1", "a_memmap_on", 16),  # DIMM blocks in Movable and Normal, boot blocks in DMA/DMA32
    ("6.1", "a_memmap_on", 22),  # after two ACPI ejects: the 1G DIMM alone in slot 2
    ("7.2", "f_virtio_mem", 5),  # virtio-mem blocks, one Normal, three Movable
    ("arm64-6.1", "a_memmap_on", 1),  # arm64 virt: the flash bank's block, RAM at 1 GiB, all DMA
])
def test_real_kernel_dumps_round_trip(memfs_mount, tmp_path, kernel, scenario, step):
    header, dumps = trace_dumps(kernel, scenario)
    dump = tmp_path / "dump"
    dump_from_trace(header, next(d for d in dumps if d["step"] == step), dump)
    check_roundtrip(memfs_mount, dump, tmp_path)


@pytest.mark.skipif(not os.path.exists("/sys/devices/system/memory/block_size_bytes"),
                    reason="this machine has no memory block sysfs")
def test_this_machine_round_trips(memfs_mount, tmp_path):
    dump = tmp_path / "dump"
    assert copy_sysroot("/", dump) > 0  # read-only copy of the live /sys and /proc files
    check_roundtrip(memfs_mount, dump, tmp_path, live=True)


def test_a_state_the_machine_refuses_is_a_description_error(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(Path(__file__).parents[2].joinpath("memfs/data/default.toml").read_text()
                      + '\n[[state]]\nblocks = "0"\nstate = "offline"\n')
    mnt = tmp_path / "mnt"
    r = memfs_cli("mount", str(mnt), "--config", str(config), "--no-sandbox")
    assert r.returncode == 2
    assert r.stderr == (f"memfs: cannot mount {mnt}: state[0]: writing offline to memory0/state fails "
                        f"(EINVAL: memory0 spans multiple zones); change the [[state]] entry or the machine\n")
    assert not os.path.ismount(mnt)


WRITING_SYSCALLS = ("open", "openat", "openat2", "creat", "mkdir", "mkdirat", "unlink", "unlinkat", "rename",
                    "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat", "truncate", "ftruncate",
                    "chmod", "fchmod", "fchmodat", "chown", "fchown", "fchownat", "lchown", "utimensat",
                    "mknod", "mknodat", "rmdir", "setxattr", "lsetxattr", "fsetxattr", "mount", "umount2")


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.skipif(not os.path.exists("/sys/devices/system/memory/block_size_bytes"),
                    reason="this machine has no memory block sysfs")
def test_describing_the_live_machine_writes_only_its_output(tmp_path):
    out = tmp_path / "live.toml"
    log = tmp_path / "strace.log"
    # a first run lets Python cache the bytecode of the modules it imports (__pycache__), as
    # any first run of an installed command may; the traced run must then write nothing else
    assert memfs_cli("describe", "-o", os.devnull).returncode == 0
    r = memfs_cli("describe", "-o", str(out), timeout=120,
                  prefix=["strace", "-f", "-qq", "-o", str(log), "-e", "trace=" + ",".join(WRITING_SYSCALLS)])
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    opens = [c for c in calls if re.search(r"\bopenat2?\(", c)]
    assert len(opens) > 100  # it did read the live sysfs through this trace
    writers = [c for c in opens if re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC|O_APPEND", c)]
    assert [re.search(r'"([^"]*)"', c).group(1) for c in writers] == [str(out)]
    others = [c for c in calls if not re.search(r"\bopenat2?\(", c) and not c.startswith("+++")
              and "exited with" not in c and "--- SIG" not in c]
    assert others == []
    assert out.read_text().startswith("# memfs machine description of this machine\n")
