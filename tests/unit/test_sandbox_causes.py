"""The daemon's reason for having no sandbox names the setting that most likely caused it
(memfs.sandbox.service.likely_cause). The first three errors are those a real systemd 252
gave with one grant of systemd/memfs@.service taken away (tests/integration/
test_systemd_nspawn.py boots the first); the fourth is the shape of a failed bind mount."""
from __future__ import annotations

import errno

import pytest

from memfs.sandbox import SandboxError
from memfs.sandbox.service import likely_cause

CASES = [
    (SandboxError("sandbox holder failed: [Errno 1] unshare(0x10000000): Operation not permitted", errno.EPERM),
     "RestrictNamespaces= must allow user mnt net pid; or user namespaces are disabled "
     "(sysctl user.max_user_namespaces)"),
    (SandboxError("writing /proc/PID/uid_map of the sandbox holder: [Errno 1] Operation not permitted",
                  errno.EPERM),
     "CapabilityBoundingSet= must include CAP_SETUID CAP_SETGID CAP_SETFCAP"),
    (OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol"),
     "RestrictAddressFamilies= must include AF_NETLINK (the uevent socket)"),
    (OSError(errno.EPERM, "mount /run/memfs/x/sys/bus/memory on /sys/bus/memory: Operation not permitted"),
     "CapabilityBoundingSet= must include CAP_SYS_ADMIN"),
]


@pytest.mark.parametrize("error,cause", CASES, ids=["namespaces", "idmap", "netlink", "mount"])
def test_under_systemd_the_unit_setting_is_named(error, cause, monkeypatch):
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")   # set by systemd
    assert likely_cause(error) == f"the unit's {cause}"


def test_outside_systemd_the_same_setting_without_the_unit(monkeypatch):
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    assert likely_cause(CASES[2][0]) == CASES[2][1]


def test_no_guess_for_other_errors():
    assert likely_cause(SandboxError("refusing: /x is not a mount point (a plain directory?)")) == ""
    assert likely_cause(OSError(errno.ENOENT, "no such file")) == ""
