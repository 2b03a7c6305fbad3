"""The entering trampoline: how a command gets into the sandbox.

``Sandbox.command`` runs ``python -c ENTRY OPTS -- CMD...``: :func:`main` joins the
holder's user, mount, network and pid namespaces, forks (only a child is inside the
pid namespace), checks again from inside (:func:`~memfs.sandbox.checks.check_in_sandbox`),
optionally gives the command a mount namespace of its own (udevd's rules), and execs it.
Exit status: the command's; 125 when the sandbox refused; 126/127 when CMD cannot run.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import sys
from typing import TypedDict

from .checks import Expectations, SandboxError, check_in_sandbox
from .libc import (CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUSER, MS_NODEV, MS_NOSUID,
                   MS_PRIVATE, MS_REC, make_readonly, mount, set_pdeathsig, setns, unshare)

EXIT_SANDBOX = 125

#: where systemd 252's udevd reads rules (src/udev/udev-rules.c:
#: RULES_DIRS = CONF_PATHS_STRV("udev/rules.d"))
UDEV_RULES_DIRS = ("/etc/udev/rules.d", "/run/udev/rules.d", "/usr/local/lib/udev/rules.d",
                   "/usr/lib/udev/rules.d", "/lib/udev/rules.d")

#: ``python -c ENTRY OPTS -- CMD ARGS...``
ENTRY = "import sys; from memfs.sandbox.enter import main; sys.exit(main())"


class PrivateMounts(TypedDict, total=False):
    udev_rules: list[str]     # directories whose *.rules are udevd's only rules
    udev_conf: str            # the text of /etc/udev/udev.conf


class EnterOptions(TypedDict):
    holder: int
    expect: Expectations
    cwd: str
    detach: bool              # run in the background: print its pid in the sandbox, exit
    mounts: PrivateMounts | None


def join(holder: int, expect: Expectations) -> None:
    """setns into the holder's user, mount, net and pid namespaces."""
    fds = {}
    try:
        for name in ("user", "mnt", "net", "pid"):
            fds[name] = os.open(f"/proc/{holder}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        for fd in fds.values():
            os.close(fd)
        raise SandboxError(f"the sandbox is gone (holder pid {holder} is not running)") from None
    if os.fstat(fds["net"]).st_ino != expect["netns"]:
        raise SandboxError(f"refusing: pid {holder} is not the sandbox holder any more")
    for name, flag in (("user", CLONE_NEWUSER), ("mnt", CLONE_NEWNS), ("net", CLONE_NEWNET),
                       ("pid", CLONE_NEWPID)):
        setns(fds[name], flag)
        os.close(fds[name])


def private_mounts(spec: PrivateMounts) -> None:
    """A mount namespace of the command's own inside the sandbox (e.g. for udevd's rules)."""
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    rules = spec.get("udev_rules")
    if rules is not None:
        # udevd reads rules from UDEV_RULES_DIRS and its settings from /etc/udev/udev.conf:
        # hide them all, then give it /etc/udev with a copy of the chosen rules only
        for d in UDEV_RULES_DIRS:
            if d.startswith("/etc/udev/"):
                continue
            if os.path.isdir(d) and os.path.realpath(d) == d:
                mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
                make_readonly(d, recursive=False)
        if not os.path.isdir("/etc/udev"):
            raise SandboxError("/etc/udev does not exist: is the udev package installed?")
        mount("tmpfs", "/etc/udev", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=4m")
        etc = "/etc/udev/rules.d"
        os.mkdir(etc)
        for src_dir in rules:
            for name in sorted(os.listdir(src_dir)):
                src = os.path.join(src_dir, name)
                if name.endswith(".rules") and os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(etc, name))
        with open("/etc/udev/udev.conf", "w") as f:
            f.write(spec.get("udev_conf") or "")
        make_readonly("/etc/udev", recursive=False)


def main() -> int:
    """``python -c ENTRY OPTS -- CMD...``: join the holder's namespaces, check, fork (to be
    inside the pid namespace) and exec CMD; exit with CMD's status."""
    opts: EnterOptions = json.loads(sys.argv[1])
    argv = sys.argv[3:]
    try:
        join(opts["holder"], opts["expect"])
    except (OSError, SandboxError) as e:
        print(f"memfs sandbox: {e}", file=sys.stderr)
        return EXIT_SANDBOX
    detach = opts.get("detach")
    if detach:
        r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        # now inside the pid namespace too: /proc/self is ours; check before anything runs
        try:
            check_in_sandbox(opts["expect"])
            if opts.get("mounts"):
                private_mounts(opts["mounts"])
            with contextlib.suppress(OSError):
                os.chdir(opts.get("cwd") or "/")
        except (OSError, SandboxError) as e:
            print(f"memfs sandbox: {e}", file=sys.stderr)
            os._exit(EXIT_SANDBOX)
        try:
            if detach:
                os.close(r)
                os.setsid()
                if os.fork() != 0:
                    os._exit(0)
                # grandchild: reparented to the sandbox's pid 1; report our pid there
                os.write(w, f"{os.getpid()}\n".encode())
                os.close(w)
                os.dup2(2, 1)   # our stdout is the caller's pipe: detach from it
            else:
                set_pdeathsig(signal.SIGKILL)   # dies with the trampoline (timeouts)
            os.execvp(argv[0], argv)
        except OSError as e:
            print(f"memfs sandbox: cannot run {argv[0]}: {e.strerror}", file=sys.stderr)
            os._exit(127 if e.errno == errno.ENOENT else 126)
    if detach:
        os.close(w)
        inner = os.read(r, 64).decode().strip()
        os.close(r)
        os.waitpid(pid, 0)
        print(inner, flush=True)
        return 0 if inner else 1
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, lambda s, f: os.kill(pid, s))
    while True:
        try:
            _, st = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(st):
        sig = os.WTERMSIG(st)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # their disposition cannot be set
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig
    return os.waitstatus_to_exitcode(st)
