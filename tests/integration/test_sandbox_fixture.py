"""The memfs_machine fixture as a user gets it: a test file outside this package, run by
its own pytest (the memfs plugin loads from the installed entry point)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from memfs.pytest_plugin import fuse_unavailable

OUTSIDE_TEST = textwrap.dedent('''
    import pytest

    MEM = "/sys/devices/system/memory"


    def test_everything_the_fixture_offers(memfs_machine, tmp_path):
        m = memfs_machine
        assert m.read(f"{MEM}/memory32/state") == "offline\\n"
        r = m.run("chmem", "-e", "-b", "32")
        assert r.returncode == 0, r.stderr
        assert m.read(f"{MEM}/memory32/state") == "online\\n"
        dev = m.plug("128M")
        assert dev["blocks"] == [{"id": 42, "state": "offline"}]
        m.write(f"{MEM}/memory42/state", "online_movable")
        assert m.run(["cat", f"{MEM}/memory42/valid_zones"]).stdout == "Movable\\n"
        a = m.alloc("8M", kind="movable")
        m.free(a["id"])
        m.write(f"{MEM}/memory42/state", "offline")
        m.unplug(dev["device"]["id"])
        assert [e["action"] for e in m.events(since=18)] == ["online", "add", "online", "offline", "remove"]
        with pytest.raises(OSError):
            m.write(f"{MEM}/memory0/state", "offline")   # boot memory with holes: EINVAL


    @pytest.mark.memfs(kernel="6.8", sets={"boot.memhp_default_state": "online"})
    def test_marker_options(memfs_machine):
        m = memfs_machine
        r = m.run("cat", "/sys/module/memory_hotplug/parameters/memmap_on_memory")
        assert r.returncode == 0 and r.stdout.strip() in ("Y", "force")
        m.plug("256M")
        assert m.read(f"{MEM}/memory42/state") == "online\\n"   # memhp_default_state=online


    @pytest.mark.parametrize("memfs_machine", [{"kernel": "5.12"}], indirect=True)
    def test_indirect_parameters(memfs_machine):
        # 5.12 has no memory_hotplug module parameters: the host's are hidden, not shown
        r = memfs_machine.run("ls", "-A", "/sys/module/memory_hotplug")
        assert r.returncode == 0 and r.stdout == ""


    @pytest.mark.memfs(udev_rules={"40-memory.rules":
        'SUBSYSTEM=="memory", ACTION=="add", ATTR{state}=="offline", ATTR{state}="online"\\n'})
    def test_udev_rules_option(memfs_machine):
        import time
        m = memfs_machine
        m.plug("128M")
        deadline = time.monotonic() + 15
        while m.read(f"{MEM}/memory42/state") != "online\\n":
            assert time.monotonic() < deadline, "udevd did not online memory42"
            time.sleep(0.05)


    def test_without_sandbox(request):
        pass
''')


def run_pytest(tmp_path, env=None, *args):
    (tmp_path / "test_outside.py").write_text(OUTSIDE_TEST)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "test_outside.py", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.skipif(fuse_unavailable() is not None, reason=fuse_unavailable() or "")
@pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")
def test_fixture_from_a_test_file_outside_the_package(tmp_path):
    needs_udevd = any(os.access(p, os.X_OK) for p in ("/lib/systemd/systemd-udevd",
                                                       "/usr/lib/systemd/systemd-udevd"))
    r = run_pytest(tmp_path)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert r.returncode == 0, r.stdout + r.stderr
    assert tail.startswith("5 passed" if needs_udevd else "4 passed"), r.stdout


def test_plugin_does_not_break_runs_without_fuse(tmp_path):
    """Without fusermount on PATH the fixture skips with the reason; other tests run."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    env = dict(os.environ, PATH=str(bindir))
    r = run_pytest(tmp_path, env, "-k", "everything or without_sandbox")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 1 skipped" in r.stdout
    assert "cannot mount memfs here: fusermount missing" in r.stdout
    assert shutil.which("fusermount", path=str(bindir)) is None
