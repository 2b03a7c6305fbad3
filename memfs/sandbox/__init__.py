"""Run unmodified hotplug software against a memfs mount: a per-mount sandbox.

What it is, how uevents reach it and what it refuses: docs/sandbox.md. The modules, along
its seams: ``libc`` (system calls), ``checks`` (the safety checks), ``holder`` (the
process that creates and keeps the namespaces), ``core`` (:class:`Sandbox`), ``enter``
(the trampoline that runs a command inside), ``uevents`` (forwarder, uevent helper),
``udevd``, ``service`` (the daemon's part) and ``cli`` (``memfs exec/udevd/monitor``).
Everything here needs root.
"""
from __future__ import annotations

from .checks import SandboxError, check_netns, initial_netns_inodes
from .core import Sandbox, open_sandbox
from .service import DaemonSandbox, MachineSandbox
from .udevd import Udevd, find_udevd
from .uevents import UeventForwarder, UeventHelper

__all__ = ["DaemonSandbox", "MachineSandbox", "Sandbox", "SandboxError", "Udevd", "UeventForwarder",
           "UeventHelper", "check_netns", "find_udevd", "initial_netns_inodes", "open_sandbox"]
