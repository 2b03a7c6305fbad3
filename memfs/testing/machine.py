"""A mounted machine plus its sandbox: what the ``memfs_machine`` fixture gives.

The fixture is registered by the ``memfs`` pytest plugin (memfs.pytest_plugin), so any
test run where memfs is installed can use it::

    import pytest

    @pytest.mark.memfs(kernel="6.1")           # optional: config=, kernel=, sets=, ...
    def test_chmem_onlines(memfs_machine):
        m = memfs_machine
        r = m.run("chmem", "-e", "-b", "32")   # runs where /sys/devices/system/memory is memfs
        assert r.returncode == 0, r.stderr
        assert m.read("/sys/devices/system/memory/memory32/state") == "online\\n"
        dev = m.plug("128M")                   # hot-add: an "add" uevent per block
        assert [e["action"] for e in m.events(since=0)][-1] == "add"

Options (marker ``@pytest.mark.memfs(...)`` or ``indirect`` parametrization with a dict):
``config`` (TOML file), ``kernel`` (profile, e.g. "6.8"), ``sets`` ({"boot.x": value}),
``sandbox`` (default True; False gives a mount without namespaces, which needs no root),
``uevent_helper`` (program run once per uevent in the sandbox), ``udev_rules``
(``{"name.rules": "text"}`` or a list of directories: starts a real systemd-udevd).

The fixture skips (with the reason) where FUSE is unavailable, and where the sandbox is
asked for but cannot be had (not root, no namespaces). Whatever happens in the test, udevd
is stopped, the daemon unmounts and stops the sandbox, and the mount is removed.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

from memfs.sandbox import Sandbox, Udevd, open_sandbox
from memfs.testing.mount import MemfsMount, fuse_unavailable, memfs_mounted

OPTIONS = ("config", "kernel", "sets", "sandbox", "uevent_helper", "udev_rules", "watchdog")


class MemfsMachine:
    """A mounted memfs machine; ``run()`` executes commands in its sandbox."""

    def __init__(self, mount: MemfsMount, sandbox: Sandbox | None) -> None:
        self.mount = mount
        self.path: Path = mount.path  # the sysroot: path/sys/..., path/proc/...
        self.sandbox = sandbox        # None with sandbox=False
        self._udevds: list[Udevd] = []
        self._tmp: list[tempfile.TemporaryDirectory] = []

    # -- the machine (control socket) ---------------------------------------------------

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        return self.mount.call(op, **{k: v for k, v in fields.items() if v is not None})

    def status(self) -> dict[str, Any]:
        return self.mount.status()

    def plug(self, size: int | str, node: int = 0, **kw: Any) -> dict[str, Any]:
        """Hot-add a device (kw: addr, id, driver, memmap_on_memory); returns
        ``{"device": {...}, "blocks": [{"id": N, "state": ...}, ...]}``."""
        return self.call("plug", size=size, node=node, **kw)

    def unplug(self, dev_id: str) -> dict[str, Any]:
        return self.call("unplug", id=dev_id)

    def alloc(self, size: int | str, kind: str = "unmovable", node: int | None = None,
              block: int | None = None) -> dict[str, Any]:
        """Allocate pages (``kind`` "unmovable" pins its blocks); returns the allocation."""
        return self.call("alloc", kind=kind, size=size, node=node, block=block)["allocation"]

    def free(self, alloc_id: int) -> None:
        self.call("free", id=alloc_id)

    def events(self, since: int = 0, wait: float = 0) -> list[dict[str, Any]]:
        """uevents with SEQNUM > since (``wait``: seconds to wait for one)."""
        return self.call("events", since=since, wait=wait or None)["events"]

    def seqnum(self) -> int:
        return self.call("events", since=1 << 62)["seqnum"]

    # -- files ------------------------------------------------------------------------

    def _p(self, path: str | os.PathLike[str]) -> Path:
        return self.path / os.fspath(path).lstrip("/")

    def read(self, path: str | os.PathLike[str]) -> str:
        """Read a sysroot file: ``read("/sys/devices/system/memory/memory32/state")``."""
        return self._p(path).read_text()

    def write(self, path: str | os.PathLike[str], data: str | bytes) -> None:
        """One write(2) of ``data`` to a sysroot file (OSError as the kernel would fail it)."""
        fd = os.open(self._p(path), os.O_WRONLY)
        try:
            os.write(fd, data.encode() if isinstance(data, str) else data)
        finally:
            os.close(fd)

    # -- the sandbox ---------------------------------------------------------------------

    def _need_sandbox(self) -> Sandbox:
        if self.sandbox is None:
            raise RuntimeError("this memfs_machine has no sandbox (sandbox=False, or the daemon "
                               "could not start one: see its log)")
        return self.sandbox

    def run(self, *cmd: str | Sequence[str], timeout: float = 60.0, check: bool = False,
            input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a command in the sandbox: ``run("lsmem")`` or ``run(["chmem", "-e", "1G"])``."""
        argv = list(cmd[0]) if len(cmd) == 1 and not isinstance(cmd[0], str) else [str(c) for c in cmd]
        return self._need_sandbox().run(argv, timeout=timeout, check=check, input=input, env=env)

    def udevd(self, rules: dict[str, str] | Sequence[str | os.PathLike[str]] = (), **kw: Any) -> Udevd:
        """Start a real systemd-udevd in the sandbox with only these rules (a dict of file
        name -> text, or directories). Stopped at the end of the test."""
        dirs: list[str]
        if isinstance(rules, dict):
            td = tempfile.TemporaryDirectory(prefix="memfs-rules-")
            self._tmp.append(td)
            for name, text in rules.items():
                Path(td.name, name).write_text(text)
            dirs = [td.name]
        else:
            dirs = [os.fspath(r) for r in rules]
        u = Udevd(self._need_sandbox(), dirs, **kw)
        self._udevds.append(u)
        return u

    def close(self) -> None:
        for u in self._udevds:
            with contextlib.suppress(Exception):
                u.stop()
        for td in self._tmp:
            td.cleanup()


def options(request: pytest.FixtureRequest) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers("memfs"))):
        opts.update(marker.kwargs)
    if hasattr(request, "param") and isinstance(request.param, dict):
        opts.update(request.param)
    unknown = set(opts) - set(OPTIONS)
    if unknown:
        raise pytest.UsageError(f"memfs_machine: unknown option(s) {sorted(unknown)}; known: {OPTIONS}")
    return opts


@contextlib.contextmanager
def memfs_machine_cm(opts: dict[str, Any]) -> Iterator[MemfsMachine]:
    """A MemfsMachine for the block (skips the test where it cannot be had)."""
    reason = fuse_unavailable()
    if reason:
        pytest.skip(f"cannot mount memfs here: {reason}")
    want_sandbox = opts.get("sandbox", True)
    if want_sandbox and os.geteuid() != 0:
        pytest.skip("memfs_machine's sandbox needs root (pass sandbox=False for a mount without it)")
    extra = ["--sandbox" if want_sandbox else "--no-sandbox"]
    if opts.get("uevent_helper"):
        extra += ["--uevent-helper", os.fspath(opts["uevent_helper"])]
    with contextlib.ExitStack() as stack:
        try:
            mount = stack.enter_context(memfs_mounted(
                config=opts.get("config"), kernel=opts.get("kernel"), sets=opts.get("sets"),
                extra=extra, watchdog=opts.get("watchdog", 300.0)))
        except RuntimeError as e:
            if want_sandbox and "sandbox" in str(e):
                pytest.skip(f"no memfs sandbox here: {e}")
            raise
        m = MemfsMachine(mount, open_sandbox(mount.path) if want_sandbox else None)
        stack.callback(m.close)
        rules = opts.get("udev_rules")
        if rules:
            m.udevd(rules)
        yield m
