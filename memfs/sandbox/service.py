"""The daemon's part: a Machine's sandbox with its uevent delivery, started once FUSE serves.

:class:`MachineSandbox` is the sandbox plus the uevent forwarder (and the optional uevent
helper) of one Machine; :class:`DaemonSandbox` is what the memfs daemon holds: it decides
whether a sandbox is wanted, records it next to the control socket
(``<run dir>/<key>.sandbox``) for ``memfs exec`` and friends, and stops it when the daemon
ends, and also when the mount disappears behind its back (``fusermount -u``: the
sandbox's copies of the mount would otherwise keep the FUSE connection alive).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from typing import TYPE_CHECKING, Sequence, TypedDict

from ..mountinfo import FSTYPE, read_mountinfo, top_mount
from .core import Sandbox, write_no_sandbox
from .uevents import UeventForwarder, UeventHelper

if TYPE_CHECKING:   # the model is the daemon's import; the trampolines need not load it
    from ..machine.hotplug import Machine

log = logging.getLogger("memfs.sandbox")


class MachineSandbox:
    """Sandbox + forwarder (+ uevent helper) for one Machine served at ``mnt``; what the
    daemon and the tests hold. ``close()`` undoes everything, in order."""

    def __init__(self, machine: Machine, mnt: str, *, uevent_helper: str | None = None,
                 state_file: str | None = None, binds: Sequence[tuple[str, str]] = (),
                 forward: bool = True) -> None:
        self.machine = machine
        self.sandbox = Sandbox.start(mnt, state_file=state_file, binds=binds)
        self.forwarder: UeventForwarder | None = None
        self.helper: UeventHelper | None = None
        try:
            if forward:
                self.forwarder = UeventForwarder(self.sandbox, machine.events)
            if uevent_helper:
                self.helper = UeventHelper(self.sandbox, machine.events, uevent_helper)
        except BaseException:
            self.close()
            raise

    def flush(self, timeout: float = 10.0) -> bool:
        ok = True
        if self.forwarder:
            ok &= self.forwarder.flush(timeout)
        if self.helper:
            ok &= self.helper.flush(timeout)
        return ok

    def close(self) -> None:
        for part in (self.helper, self.forwarder):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.close()
        self.sandbox.stop()


def likely_cause(e: BaseException) -> str:
    """The setting that most likely made ``e`` happen, for the daemon's error message.
    Under systemd these are the lines of systemd/memfs@.service (docs/sandbox.md)."""
    text = str(e)
    code = getattr(e, "errno", None)
    unit = "the unit's " if os.environ.get("INVOCATION_ID") else ""
    if code == errno.EAFNOSUPPORT:
        return f"{unit}RestrictAddressFamilies= must include AF_NETLINK (the uevent socket)"
    if code == errno.EPERM and ("unshare" in text or "setns" in text):
        return (f"{unit}RestrictNamespaces= must allow user mnt net pid; or user namespaces are "
                f"disabled (sysctl user.max_user_namespaces)")
    if code == errno.EPERM and ("uid_map" in text or "gid_map" in text or "setgroups" in text):
        return f"{unit}CapabilityBoundingSet= must include CAP_SETUID CAP_SETGID CAP_SETFCAP"
    if code == errno.EPERM:
        return f"{unit}CapabilityBoundingSet= must include CAP_SYS_ADMIN"
    if code == errno.ENOSPC and "unshare" in text:
        return "too many namespaces (sysctl user.max_user_namespaces and the like)"
    return ""


class SandboxStatus(TypedDict):
    """The ``sandbox`` part of ``memfs status --json``."""
    mode: str                 # auto, on (--sandbox) or off (--no-sandbox)
    running: bool
    holder: int | None        # host pid of the sandbox's pid 1
    error: str | None         # why there is none (when running is false)


class DaemonSandbox:
    """What the memfs daemon holds for its mount: a MachineSandbox, or why there is none."""

    def __init__(self, machine: Machine, mnt: str, sock_path: str, *, mode: str = "auto",
                 uevent_helper: str | None = None) -> None:
        self.machine = machine
        self.mnt = mnt
        self.mode = mode
        self.uevent_helper = uevent_helper
        base = sock_path[:-len(".sock")] if sock_path.endswith(".sock") else sock_path
        self.state_file = base + ".sandbox"
        run_dir = os.path.dirname(sock_path)
        self.binds = [(run_dir, run_dir)] if run_dir.startswith("/run/") else []
        self.attachment: MachineSandbox | None = None
        self.error: str | None = None
        #: updated in place; the control socket's status shows it
        self.status: SandboxStatus = {"mode": mode, "running": False, "holder": None, "error": None}
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def _none(self, reason: str, code: int | None = None) -> None:
        """There is no sandbox, because of ``reason``: say so in the status and where
        ``memfs exec`` looks for the sandbox."""
        self.status.update(running=False, holder=None, error=reason)
        try:
            write_no_sandbox(self.state_file, self.mnt, reason, code)
        except OSError as e:
            log.warning("cannot record the sandbox's state in %s: %s", self.state_file, e)

    def wanted(self) -> bool:
        if self.mode == "off":
            self._none("it was mounted with --no-sandbox")
            return False
        if os.geteuid() != 0:
            if self.mode == "on" or self.uevent_helper:
                self.error = "the sandbox needs root"
            else:
                log.info("no sandbox for %s: not running as root", self.mnt)
            self._none("the daemon does not run as root")
            return False
        return True

    def start(self) -> bool:
        """Start everything; False (with ``self.error``) if it failed and was required."""
        if not self.wanted():
            return self.error is None
        try:
            self.attachment = MachineSandbox(self.machine, self.mnt, uevent_helper=self.uevent_helper,
                                             state_file=self.state_file, binds=self.binds)
        except Exception as e:   # noqa: BLE001 - reported, never fatal in auto mode
            cause = likely_cause(e)
            reason = f"the daemon could not start it: {e}" + (f" ({cause})" if cause else "")
            self.error = f"sandbox: {e}" + (f" ({cause})" if cause else "")
            log.warning("%s", self.error)
            self._none(reason, getattr(e, "errno", None))
            return self.mode != "on" and not self.uevent_helper
        sb = self.attachment.sandbox
        self.status.update(running=True, holder=sb.holder, error=None)
        log.info("sandbox for %s ready: holder pid %d, net:[%d]; uevents forwarded%s", self.mnt,
                 sb.holder, sb.netns, f", uevent helper {self.uevent_helper}" if self.uevent_helper else "")
        self._watcher = threading.Thread(target=self._watch, name="memfs-sandbox-watch", daemon=True)
        self._watcher.start()
        return True

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            try:
                top = top_mount(read_mountinfo(), self.mnt)
            except OSError:
                continue
            if top is None or top.fstype != FSTYPE:
                log.info("%s was unmounted: stopping its sandbox", self.mnt)
                self.close()
                return

    def close(self) -> None:
        self._stop.set()
        att, self.attachment = self.attachment, None
        if att is not None:
            att.close()   # removes the state file
            self.status.update(running=False, holder=None, error="stopped")
        elif self.status["error"] is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.state_file)
