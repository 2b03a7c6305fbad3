"""``memfs exec``, ``memfs udevd``, ``memfs monitor`` and the sandbox options of ``memfs mount``.

Registered into ``memfs`` by :func:`add_commands` (memfs/cli.py). Exit codes: the
command's own for ``exec``; 125 when the sandbox refuses or is missing; 126/127 when
the command cannot be run; 2 for usage errors; 1 for other failures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable

from .. import control
from .checks import SandboxError
from .core import Sandbox, env_with_package, open_sandbox
from .enter import EXIT_SANDBOX
from .udevd import Udevd, find_udevd


def add_daemon_arguments(p: argparse.ArgumentParser) -> None:
    """``--sandbox``/``--no-sandbox``/``--uevent-helper`` for ``memfs mount`` and the daemon."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sandbox", dest="sandbox", action="store_const", const="on", default="auto",
                   help="require the sandbox (memfs exec/udevd/monitor, uevents); default: start it "
                        "when running as root")
    g.add_argument("--no-sandbox", dest="sandbox", action="store_const", const="off",
                   help="no sandbox: no namespaces, no uevent delivery")
    p.add_argument("--uevent-helper", metavar="PROG",
                   help="run PROG SUBSYSTEM once per uevent, in order, inside the sandbox, with the "
                        "event's properties in its environment (like the kernel's uevent_helper)")


def daemon_args(a: argparse.Namespace) -> list[str]:
    """The daemon options that ``memfs mount`` passes on."""
    out = []
    if getattr(a, "sandbox", "auto") != "auto":
        out += ["--sandbox" if a.sandbox == "on" else "--no-sandbox"]
    if getattr(a, "uevent_helper", None):
        out += ["--uevent-helper", os.path.abspath(a.uevent_helper)
                if os.sep in a.uevent_helper else a.uevent_helper]
    return out


class _Fail(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _sandbox_or_fail(mnt: str) -> Sandbox:
    try:
        return open_sandbox(mnt)
    except SandboxError as e:
        raise _Fail(EXIT_SANDBOX, str(e)) from None


def cmd_exec(a: argparse.Namespace) -> int:
    argv = list(a.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise _Fail(2, "exec: no command given (memfs exec MNT -- CMD ARGS...)")
    sb = _sandbox_or_fail(os.path.realpath(a.mountpoint))
    p = sb.popen(argv)   # inherits our stdin/stdout/stderr
    try:
        return p.wait()
    except KeyboardInterrupt:
        p.wait(10)
        return 130


def cmd_udevd(a: argparse.Namespace) -> int:
    sb = _sandbox_or_fail(os.path.realpath(a.mountpoint))
    if a.stop:
        r = sb.run(["udevadm", "control", "--exit", "--timeout=10"], timeout=20)
        if r.returncode != 0:
            raise _Fail(1, f"udevd: {r.stderr.strip() or 'no udevd answers in the sandbox'}")
        print("udevd stopped")
        return 0
    exe = find_udevd()
    if exe is None:
        raise _Fail(1, "systemd-udevd not found: apt-get install udev")
    rules = [os.path.realpath(r) for r in a.rules]
    for r in rules:
        if not os.path.isdir(r):
            raise _Fail(2, f"--rules {r}: not a directory")
    if a.foreground:
        argv = [exe, "--resolve-names=never"] + (["--debug"] if a.debug else [])
        env = env_with_package(dict(os.environ, SYSTEMD_DEVICE_VERIFY_SYSFS="0"))
        cmd = sb.command(argv, cwd="/", unshare_mounts={"udev_rules": rules, "udev_conf": ""})
        return subprocess.call(cmd, env=env)
    try:
        u = Udevd(sb, rules, debug=a.debug, log_path=a.log)
    except SandboxError as e:
        raise _Fail(1, str(e)) from None
    print(f"udevd running in the sandbox of {sb.mnt} (pid {u.pid} there; rules: "
          f"{', '.join(rules) or 'none'}); stop it with: memfs udevd {sb.mnt} --stop")
    return 0


def _format_event(ev: dict[str, object], as_json: bool) -> str:
    if as_json:
        return json.dumps(ev, sort_keys=True)
    head = f"KERNEL[{time.monotonic():.6f}] {ev['action']:<8} {ev['devpath']} ({ev['subsystem']})"
    env = ev["env"]
    assert isinstance(env, dict)
    return head + "".join(f"\n{k}={v}" for k, v in env.items()) + "\n"


def cmd_monitor(a: argparse.Namespace) -> int:
    mnt = os.path.realpath(a.mountpoint)
    deadline = time.monotonic() + a.timeout if a.timeout else None
    seen = 0
    with control.ControlClient(mnt, timeout=90) as c:
        since = a.since if a.since is not None else c.call("events", since=1 << 62)["seqnum"]
        if not a.json:
            print("monitor will print the received events for:\nMEMFS - the memfs machine's uevents\n",
                  flush=True)
        while True:
            wait = 30.0
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return 0
            r = c.call("events", since=since, wait=max(wait, 0.01), timeout=wait + 30)
            for ev in r["events"]:
                print(_format_event(ev, a.json), flush=True)
                since = max(since, ev["seqnum"])
                seen += 1
                if a.count and seen >= a.count:
                    return 0
            since = max(since, r["seqnum"]) if not r["events"] else since


def add_commands(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    """Register exec, udevd and monitor with ``cmd(name, fn, help)`` from memfs.cli."""
    sp = cmd("exec", _wrap(cmd_exec), "run a command in MNT's sandbox, where MNT's memory sysfs and "
                                      "/proc files replace the real ones (needs root)")
    sp.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                    help="the command and its arguments")

    sp = cmd("udevd", _wrap(cmd_udevd), "run a real systemd-udevd in MNT's sandbox, reading only the "
                                        "rules of the given directories (needs root)")
    sp.add_argument("--rules", action="append", default=[], metavar="DIR",
                    help="a directory of *.rules files (repeatable; copied when udevd starts)")
    sp.add_argument("--foreground", action="store_true", help="run udevd in the foreground")
    sp.add_argument("--debug", action="store_true", help="udevd --debug")
    sp.add_argument("--log", metavar="FILE", help="append udevd's output to FILE (background udevd)")
    sp.add_argument("--stop", action="store_true", help="stop the sandbox's udevd")

    sp = cmd("monitor", _wrap(cmd_monitor), "print MNT's uevents as they happen (like udevadm monitor "
                                            "--kernel --property)")
    sp.add_argument("--json", action="store_true", help="one JSON object per event and line")
    sp.add_argument("--since", type=int, metavar="N", help="start after SEQNUM N (default: now)")
    sp.add_argument("--count", type=int, default=0, metavar="N", help="exit after N events")
    sp.add_argument("--timeout", type=float, default=0, metavar="S", help="exit after S seconds")


def _wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(a: argparse.Namespace) -> int:
        try:
            return fn(a)
        except (_Fail, SandboxError) as e:
            print(f"memfs: {e}", file=sys.stderr)
            return getattr(e, "code", EXIT_SANDBOX)
        except subprocess.TimeoutExpired as e:
            print(f"memfs: timed out: {e}", file=sys.stderr)
            return 1
    return run
