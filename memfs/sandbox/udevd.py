"""A real systemd-udevd inside the sandbox, reading only the rules it is given."""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
from typing import IO, Sequence

from .checks import SandboxError
from .core import Sandbox, env_with_package

UDEVD_CANDIDATES = ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd")


def find_udevd() -> str | None:
    for p in UDEVD_CANDIDATES:
        if os.access(p, os.X_OK):
            return p
    return None


class Udevd:
    """A real systemd-udevd in the sandbox, reading only the given rules directories."""

    def __init__(self, sandbox: Sandbox, rules: Sequence[str | os.PathLike[str]] = (), *,
                 debug: bool = False, log_path: str | None = None, timeout: float = 20.0,
                 children_max: int = 4, event_timeout: int = 30) -> None:
        exe = find_udevd()
        if exe is None:
            raise SandboxError("systemd-udevd not found (install the udev package: apt-get install udev)")
        self.sandbox = sandbox
        self.rules = [os.path.realpath(os.fspath(r)) for r in rules]
        for r in self.rules:
            if not os.path.isdir(r):
                raise SandboxError(f"rules directory {r} does not exist")
        argv = [exe, f"--children-max={children_max}", f"--event-timeout={event_timeout}",
                "--resolve-names=never"]
        if debug:
            argv.append("--debug")
        self.log_path = log_path
        # SYSTEMD_DEVICE_VERIFY_SYSFS=0: accept device directories on FUSE, not sysfs
        env = env_with_package(dict(os.environ, SYSTEMD_DEVICE_VERIFY_SYSFS="0", SYSTEMD_LOG_TARGET="console"))
        if debug:
            env["SYSTEMD_LOG_LEVEL"] = "debug"
        cmd = sandbox.command(argv, cwd="/", detach=True,
                              unshare_mounts={"udev_rules": self.rules, "udev_conf": "udev_log=info\n"})
        with contextlib.ExitStack() as stack:
            out: IO[bytes] | int = (stack.enter_context(open(log_path, "ab")) if log_path
                                    else subprocess.DEVNULL)
            r = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=out, timeout=timeout)
        if r.returncode != 0 or not r.stdout.strip().isdigit():
            raise SandboxError(f"systemd-udevd did not start (status {r.returncode})"
                               + (f"; see {log_path}" if log_path else ""))
        self.pid = int(r.stdout.strip())   # pid inside the sandbox
        deadline = time.monotonic() + timeout
        while True:
            p = sandbox.run(["udevadm", "control", "--ping", "--timeout=2"], timeout=10)
            if p.returncode == 0:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise SandboxError(f"systemd-udevd did not answer a ping: {p.stderr.strip()}"
                                   + (f"; see {log_path}" if log_path else ""))
            time.sleep(0.1)

    def settle(self, timeout: float = 30.0) -> bool:
        p = self.sandbox.run(["udevadm", "settle", f"--timeout={int(timeout)}"], timeout=timeout + 10)
        return p.returncode == 0

    def stop(self) -> None:
        if not self.sandbox.alive():
            return
        with contextlib.suppress(SandboxError, subprocess.TimeoutExpired):
            p = self.sandbox.run(["udevadm", "control", "--exit", "--timeout=5"], timeout=15)
            if p.returncode != 0:
                self.sandbox.run(["kill", "-KILL", str(self.pid)], timeout=10)
