"""memfs.mountinfo: the one /proc/PID/mountinfo parser (daemon, CLI, sandbox, tests)."""
from __future__ import annotations

from memfs.mountinfo import FSTYPE, MountEntry, mounts_at, read_mountinfo, top_mount, unescape

# two memfs mounts stacked on a path with a space and a tab (the kernel writes them as
# \040 and \011: fs/proc_namespace.c, show_mountinfo -> seq_path_root, escaping " \t\n\\"),
# a bind of its memory directory, and a line with optional fields ("shared:1")
SAMPLE = (
    "22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw\n"
    "90 30 0:55 / /tmp/a\\040b\\011c rw,nosuid,nodev,relatime shared:1 - fuse.memfs memfs "
    "rw,user_id=0,group_id=0,allow_other\n"
    "91 90 0:56 / /tmp/a\\040b\\011c rw,nosuid,nodev,relatime - fuse.memfs memfs rw\n"
    "92 22 0:56 /sys/devices/system/memory /sys/devices/system/memory rw,relatime - fuse.memfs memfs rw\n"
    "93 1 0:57 / /back\\134slash rw - tmpfs none\\040x rw\n"
)


def test_unescape_octal_escapes_only():
    assert unescape("/tmp/a\\040b\\011c\\012d\\134e") == "/tmp/a b\tc\nd\\e"
    assert unescape("/plain\\x/no\\04") == "/plain\\x/no\\04"   # not three octal digits


def test_read_mountinfo_fields(tmp_path):
    p = tmp_path / "mountinfo"
    p.write_text(SAMPLE)
    entries = read_mountinfo(str(p))
    assert [e.mount_id for e in entries] == [22, 90, 91, 92, 93]
    assert entries[1] == MountEntry(90, 30, "0:55", "/", "/tmp/a b\tc",
                                    "rw,nosuid,nodev,relatime", FSTYPE, "memfs")
    assert entries[3].root == "/sys/devices/system/memory" and entries[3].dev == "0:56"
    assert (entries[4].target, entries[4].source) == ("/back\\slash", "none x")
    # the visible mount is the last one mounted at a path
    assert top_mount(entries, "/tmp/a b\tc").mount_id == 91
    assert top_mount(entries, "/nowhere") is None


def test_mounts_at_reads_this_process(tmp_path):
    assert mounts_at(tmp_path) == []
    assert "proc" in mounts_at("/proc")
