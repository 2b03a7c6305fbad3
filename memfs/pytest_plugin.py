"""pytest plugin (registered as the ``memfs`` pytest11 entry point): memfs mounts as fixtures.

For testing tools that read and write /sys/devices/system/memory::

    def test_onlining(memfs_mount):
        m = memfs_mount()                                  # the embedded default machine
        (m.path / "sys/devices/system/memory/memory32/state").write_text("online")
        assert m.status()["blocks"][8]["state"] == "online"
        m.call("plug", size="128M")                        # a control op (memfs.control)
        r = m.cli("unplug", "dimm4")                       # or the memfs CLI: memfs unplug MNT dimm4

``memfs_mount(config=None, kernel=None, sets=None, extra=())`` mounts a machine for the
test (memfs.testing.mount.memfs_mounted); ``memfs_machine`` is a mounted machine with its
sandbox, whose ``run()`` executes commands where the memory sysfs and /proc files are
memfs's (memfs.testing.machine; options by the ``memfs`` marker). Both skip with the
reason where FUSE (or, for the sandbox, root) is missing, and tear everything down.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import pytest

from memfs.testing.machine import MemfsMachine, memfs_machine_cm, options
from memfs.testing.mount import (CLI_TIMEOUT, MemfsMount, _cleanup, _pid_gone, fuse_unavailable,
                                 memfs_cli, memfs_mounted)

# the helpers memfs's own tests import from here
__all__ = ["CLI_TIMEOUT", "MemfsMachine", "MemfsMount", "_cleanup", "_pid_gone", "fuse_unavailable",
           "memfs_cli", "memfs_machine", "memfs_mount", "memfs_mounted", "pytest_configure"]


@pytest.fixture
def memfs_mount() -> Iterator[Callable[..., MemfsMount]]:
    """Factory: ``memfs_mount(config=None, kernel=None, sets=None, extra=())`` -> MemfsMount."""
    reason = fuse_unavailable()
    if reason:
        pytest.skip(f"cannot mount memfs here: {reason}")
    with contextlib.ExitStack() as stack:
        def make(**kw: Any) -> MemfsMount:
            return stack.enter_context(memfs_mounted(**kw))
        yield make


@pytest.fixture
def memfs_machine(request: pytest.FixtureRequest) -> Iterator[MemfsMachine]:
    """A mounted memfs machine with its sandbox; see memfs.testing.machine."""
    with memfs_machine_cm(options(request)) as m:
        yield m


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "memfs(config=None, kernel=None, sets=None, sandbox=True, uevent_helper=None, "
                   "udev_rules=None): options of the memfs_machine fixture")
