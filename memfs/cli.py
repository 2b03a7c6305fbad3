"""The ``memfs`` command: mount a machine, look at it, plug and unplug memory.

Exit codes: 0 ok, 1 error, 2 usage or machine-description error, 3 busy (a block could
not be offlined; nothing changed), 4 no memfs is mounted at MNT.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any, Callable

from . import __version__, control, daemon
from .daemon import lazy_unmount, parse_mode
from .mountinfo import FSTYPE, mounts_at
from .sandbox.cli import add_commands, add_daemon_arguments, daemon_args
from .status import human_size

# The model (memfs.machine) and memfs.describe are imported inside the
# commands that use them: each adds 30-60 ms to the start of every `memfs` command
# (measured: `import memfs.cli` 70 ms; with memfs.machine.config 100 ms, with
# memfs.describe 130 ms), which `memfs status`, `plug` or `events` in a udev rule do not need.

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_BUSY, EXIT_NOT_MOUNTED = 0, 1, 2, 3, 4
DRIVERS = ("acpi", "probe", "dax_kmem", "virtio_mem")
#: seconds an unplug may take: offlining is slow with offline_latency_ms (up to 60 s a block)
UNPLUG_TIMEOUT = 600.0


class Fail(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def err(msg: str) -> None:
    print(f"memfs: {msg}", file=sys.stderr)


def _size(text: str, what: str) -> int:
    from .machine.config import ConfigError, parse_size
    try:
        return parse_size(text, what)
    except ConfigError as e:
        raise Fail(EXIT_USAGE, str(e)) from None


# ---------------------------------------------------------------------- mount / umount

def _load_config(a: argparse.Namespace) -> None:
    """Check the machine description before starting anything (exit 2 if it is wrong)."""
    from .machine.config import ConfigError, load_config, parse_sets
    try:
        overrides = parse_sets(a.set)
    except ConfigError as e:
        raise Fail(EXIT_USAGE, str(e)) from None
    try:
        cfg = load_config(a.config, overrides=overrides, kernel=a.kernel)
    except ConfigError as e:
        raise Fail(EXIT_USAGE, f"{a.config or 'default machine'}: {e}") from None
    except OSError as e:
        raise Fail(EXIT_USAGE, f"cannot read the machine description {a.config}: {e.strerror}") from None
    if a.kernel and a.kernel.strip() != cfg.kernel:  # a release string: say which profile covers it
        from .machine.profiles import resolve_kernel
        print(f"memfs: note: {resolve_kernel(a.kernel)[1]}", file=sys.stderr)


def _daemon_args(a: argparse.Namespace, mnt: str) -> list[str]:
    args = [mnt]
    if a.config:
        args += ["--config", os.path.abspath(a.config)]
    if a.kernel:
        args += ["--kernel", a.kernel]
    for kv in a.set:
        args += ["--set", kv]
    if a.state:
        args += ["--state", os.path.abspath(a.state)]
    if a.control_mode is not None:
        args += ["--control-mode", f"{a.control_mode:o}"]
    if a.page_cache:
        args.append("--page-cache")
    args += daemon_args(a)
    return args


def _read_line(fd: int, timeout: float) -> str | None:
    """One line from the readiness pipe; "" on EOF, None on timeout."""
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()


def _log_tail(path: str, n: int = 8) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()[-n:]
    except OSError:
        return ""
    return "\n".join("  " + line for line in lines)


def cmd_mount(a: argparse.Namespace) -> int:
    _load_config(a)
    mnt = os.path.realpath(a.mountpoint)
    if a.foreground:
        daemon.setup_logging(a.debug)
        return daemon.run(mnt, config=a.config, kernel=a.kernel, sets=a.set, state=a.state,
                          control_mode=a.control_mode if a.control_mode is not None else control.DEFAULT_MODE,
                          debug=a.debug, sandbox=a.sandbox, uevent_helper=a.uevent_helper,
                          page_cache=a.page_cache)
    try:
        paths = control.paths_in(control.choose_run_dir(), mnt)
    except OSError as e:
        raise Fail(EXIT_ERROR, e.strerror or str(e)) from None
    r, w = os.pipe()
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    env.pop("NOTIFY_SOCKET", None)  # the background daemon is nobody's service
    with open(paths["log"], "a") as logf:
        logf.write(f"--- memfs mount {mnt} ---\n")
        logf.flush()
        proc = subprocess.Popen([sys.executable, "-m", "memfs.daemon", *_daemon_args(a, mnt)]
                                + (["--ready-fd", str(w)]) + (["--debug"] if a.debug else []),
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(w,),
                                start_new_session=True, cwd="/", env=env)
    os.close(w)
    try:
        line = _read_line(r, a.timeout)
    finally:
        os.close(r)
    if line is not None and line.startswith("ready"):
        print(f"memfs mounted at {mnt} (daemon pid {proc.pid}; log {paths['log']})")
        return EXIT_OK
    if line is None:  # no word within the timeout: stop the daemon we started
        proc.kill()
        proc.wait(10)
        if FSTYPE in mounts_at(mnt):
            lazy_unmount(mnt)
        raise Fail(EXIT_ERROR, f"the daemon did not get {mnt} mounted within {a.timeout:g} s; "
                               f"see {paths['log']}:\n{_log_tail(paths['log'])}")
    try:
        rc = proc.wait(10)
    except subprocess.TimeoutExpired:
        rc = None
    if line.startswith("error "):
        _, code, msg = (line.split(" ", 2) + [""])[:3]
        raise Fail(int(code) if code.isdigit() else EXIT_ERROR, f"cannot mount {mnt}: {msg}")
    raise Fail(EXIT_ERROR, f"the daemon exited (status {rc}) before {mnt} was mounted; see {paths['log']}:\n"
                           f"{_log_tail(paths['log'])}")


def pid_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts: it is not ours to reap).

    A killed multi-threaded daemon's leader turns zombie while its other threads may still
    be exiting, and those still hold the descriptor table (its flock, /dev/fuse): it is
    gone only when /proc/PID/task lists the leader alone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                return False
        return len(os.listdir(f"/proc/{pid}/task")) <= 1
    except (OSError, IndexError):
        return True


def cmd_umount(a: argparse.Namespace) -> int:
    mnt = os.path.realpath(a.mountpoint)
    try:
        client = control.ControlClient(mnt, timeout=10)
    except control.NotRunning:
        if FSTYPE in mounts_at(mnt):
            while FSTYPE in mounts_at(mnt):
                r = lazy_unmount(mnt)
                if r.returncode:
                    raise Fail(EXIT_ERROR, f"fusermount -u -z {mnt} failed: {r.stderr.strip()}")
            print(f"memfs: removed the dead memfs mount at {mnt}")
            return EXIT_OK
        raise
    with client:
        pid = client.call("shutdown")["pid"]
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        if pid_gone(pid) and FSTYPE not in mounts_at(mnt):
            return EXIT_OK
        time.sleep(0.05)
    if FSTYPE in mounts_at(mnt):
        lazy_unmount(mnt)
    raise Fail(EXIT_ERROR, f"the memfs daemon (pid {pid}) did not exit within {a.timeout:g} s; "
                           f"the mount at {mnt} was detached with fusermount -u -z")


# ---------------------------------------------------------------------- control commands

def _call(a: argparse.Namespace, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
    with control.ControlClient(os.path.realpath(a.mountpoint)) as c:
        return c.call(op, timeout=timeout, **fields)


def cmd_status(a: argparse.Namespace) -> int:
    # The daemon renders (text) or serializes (JSON) the status itself: at 65,536 blocks
    # the object is ~22 MB of JSON, and decoding it here only to print it again would
    # take seconds.  --json prints the object as one compact line.
    if a.json:
        raw = _call(a, "status", format="json")["status"]
        sys.stdout.buffer.write(raw + b"\n")
        sys.stdout.buffer.flush()
    else:
        sys.stdout.write(_call(a, "status", format="text")["text"])
    return EXIT_OK


def cmd_plug(a: argparse.Namespace) -> int:
    size = _size(a.size, "--size")
    addr = _size(a.addr, "--addr") if a.addr is not None else None
    requested = _size(a.requested, "--requested") if a.requested is not None else None
    if requested is not None and a.driver != "virtio_mem":
        raise Fail(EXIT_USAGE, "--requested is for --driver virtio_mem (its region is --size); "
                               "other devices are plugged whole")
    r = _call(a, "plug", size=size, node=a.node, addr=addr, id=a.id, driver=a.driver,
              memmap_on_memory=a.memmap_on_memory or None, requested=requested)
    if a.json:
        print(json.dumps({"device": r["device"], "blocks": r["blocks"]}, indent=2))
    else:
        print(f"{r['device']['id']}: " + (" ".join(f"memory{b['id']} ({b['state']})" for b in r["blocks"])
                                           or "(no memory blocks)"))
        if not r["blocks"] and r["device"]["driver"] == "acpi":
            print(f"memfs: {r['device']['id']} sits in its ACPI slot but gives no memory: this kernel has no "
                  f"ACPI memory hotplug (CONFIG_ACPI_HOTPLUG_MEMORY is not set, as in Debian's arm64 kernels); "
                  f"remove it with: memfs unplug {a.mountpoint} {r['device']['id']}; hot-add with --driver virtio_mem "
                  f"or --driver dax_kmem", file=sys.stderr)
    return EXIT_OK


def cmd_unplug(a: argparse.Namespace) -> int:
    try:
        r = _call(a, "unplug", timeout=UNPLUG_TIMEOUT, id=a.id)
    except control.ControlError as e:
        if e.errno == errno.EBUSY:
            raise Fail(EXIT_BUSY, f"cannot unplug {a.id}: {e.message}; nothing changed. A block of it "
                                  f"holds unmovable pages or its movable pages have nowhere to go: free "
                                  f"them (memfs status lists allocations; memfs free MNT ID) and retry") from None
        raise
    if a.json:
        print(json.dumps({"id": r["id"], "blocks": r["blocks"]}))
    else:
        print(f"{r['id']}: removed " + " ".join(f"memory{b}" for b in r["blocks"]))
    return EXIT_OK


def _resized(r: dict) -> str:
    d = r["device"]
    line = (f"{d['id']}: requested {human_size(d['requested'])}, plugged {human_size(d['plugged'])}: "
            + (" ".join(f"memory{b['id']} ({b['state']})" for b in r["blocks"]) or "no blocks"))
    if d["plugged"] < d["requested"]:
        line += ("\nthe driver adds more once blocks are onlined (it keeps at most 1 GiB it added offline): "
                 "online them, e.g. echo online_movable > MNT/sys/devices/system/memory/memoryN/state")
    return line


def cmd_resize(a: argparse.Namespace) -> int:
    size = _size(a.size, "SIZE")
    try:
        r = _call(a, "resize", timeout=UNPLUG_TIMEOUT, id=a.id, size=size)
    except control.ControlError as e:
        if e.errno == errno.EBUSY:
            raise Fail(EXIT_BUSY, f"cannot shrink {a.id} to {a.size}: {e.message}. The blocks that are left "
                                  f"hold unmovable pages or their movable pages have nowhere to go: free them "
                                  f"(memfs status lists allocations; memfs free MNT ID) and run the resize again") \
                from None
        raise
    if a.json:
        print(json.dumps({"device": r["device"], "blocks": r["blocks"]}, indent=2))
    else:
        print(_resized(r))
    return EXIT_OK


def cmd_alloc(a: argparse.Namespace) -> int:
    size = _size(a.size, "SIZE")
    r = _call(a, "alloc", kind="movable" if a.movable else "unmovable", size=size, node=a.node, block=a.block)
    if a.json:
        print(json.dumps(r["allocation"]))
    else:
        print(r["allocation"]["id"])
    return EXIT_OK


def cmd_free(a: argparse.Namespace) -> int:
    _call(a, "free", id=a.alloc_id)
    return EXIT_OK


def cmd_events(a: argparse.Namespace) -> int:
    r = _call(a, "events", timeout=a.wait + 30, since=a.since, wait=a.wait or None)
    if a.json:
        print(json.dumps({"seqnum": r["seqnum"], "events": r["events"]}, indent=2))
        return EXIT_OK
    for ev in r["events"]:
        extra = " ".join(f"{k}={v}" for k, v in ev["env"].items()
                         if k not in ("ACTION", "DEVPATH", "SUBSYSTEM", "SEQNUM"))
        print(f"{ev['seqnum']:>6} {ev['action']:<8} {ev['devpath']} ({ev['subsystem']})"
              + (f" {extra}" if extra else ""))
    return EXIT_OK


# ---------------------------------------------------------------------- describe

def cmd_describe(a: argparse.Namespace) -> int:
    """Read a machine (read-only) and write its machine description."""
    sys.dont_write_bytecode = True  # describe writes its output file and nothing else
    from .describe import DescribeError, describe
    try:
        d = describe(a.sysroot, kernel=a.kernel, arch=a.arch)
    except DescribeError as e:
        raise Fail(EXIT_USAGE, str(e)) from None
    except OSError as e:
        raise Fail(EXIT_ERROR, f"cannot read {a.sysroot}: {e.strerror or e}") from None
    if a.output in (None, "-"):
        sys.stdout.write(d.text)
    else:
        try:
            with open(a.output, "w") as f:
                f.write(d.text)
        except OSError as e:
            raise Fail(EXIT_ERROR, f"cannot write {a.output}: {e.strerror or e}") from None
    for diff in d.differences[:10]:
        err(f"not reproduced: {diff}")
    if len(d.differences) > 10:
        err(f"... and {len(d.differences) - 10} more (listed at the end of the description)")
    return EXIT_OK


# ---------------------------------------------------------------------- parser

EPILOG = """exit codes: 0 ok, 1 error, 2 usage or machine-description error,
3 busy (a block could not be offlined: unplug changed nothing, resize keeps what it
removed), 4 no memfs is mounted at MNT"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memfs", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Emulate Linux memory hotplug: a FUSE sysroot (MNT/sys, MNT/proc) backed by a "
                    "model of the kernel's memory blocks, zones and memmap_on_memory accounting.")
    p.add_argument("--version", action="version", version=f"memfs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(fn=fn)
        sp.add_argument("mountpoint", metavar="MNT", help="the memfs mount point")
        return sp

    sp = cmd("mount", cmd_mount, "mount a machine at MNT; returns once the mount serves")
    sp.add_argument("--config", metavar="FILE", help="machine description (TOML); default: the embedded machine")
    sp.add_argument("--kernel", metavar="V", help="kernel profile (e.g. 6.1, 6.12, 7.2) or a release such as 6.12.117+deb13-amd64, "
                         "which picks the newest profile not newer than it (overrides the file's kernel)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one key of the description, e.g. --set boot.memhp_default_state=online "
                         "(VALUE in TOML syntax, or a bare string); repeatable")
    sp.add_argument("--foreground", action="store_true",
                    help="serve in this process until unmounted (for service managers; sends READY=1 to "
                         "$NOTIFY_SOCKET when set)")
    sp.add_argument("--state", metavar="FILE",
                    help="keep the machine in FILE: every change is saved (fsynced) before the write "
                         "or request that made it returns, and the next mount with the same FILE "
                         "resumes from it (created if missing; a corrupt file, or one made for "
                         "another machine description, is refused: exit 1 or 2)")
    sp.add_argument("--control-mode", type=parse_mode, metavar="MODE",
                    help="permission bits of the control socket (octal; default 0600: owner only)")
    sp.add_argument("--page-cache", action="store_true",
                    help="serve attribute texts from the kernel's page cache: reads as fast as "
                         "real sysfs (docs/performance.md; opt-in while a kill -9 hazard is open)")
    sp.add_argument("--timeout", type=float, default=30.0, metavar="S",
                    help="seconds to wait for the mount to serve (default 30)")
    sp.add_argument("--debug", action="store_true", help="log every FUSE request (libfuse -d)")
    add_daemon_arguments(sp)

    sp = cmd("umount", cmd_umount, "unmount MNT and stop its daemon (also removes a dead memfs mount)")
    sp.add_argument("--timeout", type=float, default=15.0, metavar="S",
                    help="seconds to wait for the daemon to exit (default 15)")

    sp = cmd("status", cmd_status, "zones, devices and a memory map of the machine at MNT")
    sp.add_argument("--json", action="store_true", help="print the status object (keys: see docs/cli.md)")

    sp = cmd("plug", cmd_plug, "hot-add a memory device; prints its id and new blocks")
    sp.add_argument("--size", required=True, metavar="SIZE", help="e.g. 128M, 1G, 0x8000000 (block-size multiple)")
    sp.add_argument("--node", type=int, default=0, metavar="N", help="NUMA node (default 0)")
    sp.add_argument("--addr", metavar="ADDR", help="physical address (default: first fit in the hotplug window)")
    sp.add_argument("--id", metavar="ID", help="device id (default: dimmN for acpi, DRIVERN otherwise)")
    sp.add_argument("--driver", choices=DRIVERS, default="acpi",
                    help="what adds the memory: an ACPI DIMM (default), a probe write, dax/kmem, virtio-mem")
    sp.add_argument("--memmap-on-memory", action="store_true",
                    help="request memmap_on_memory (dax_kmem only; ACPI DIMMs follow boot.memmap_on_memory)")
    sp.add_argument("--requested", metavar="SIZE",
                    help="virtio_mem only: the size plugged now, --size being the region (default: all "
                         "of it); memfs resize changes it later")
    sp.add_argument("--json", action="store_true", help="print the device and blocks as JSON")

    sp = cmd("unplug", cmd_unplug, "hot-remove a device: offline its blocks and remove them "
                                   "(exit 3 if a block cannot be offlined)")
    sp.add_argument("id", metavar="ID", help="device id (see memfs status)")
    sp.add_argument("--json", action="store_true")

    sp = cmd("resize", cmd_resize, "change a virtio-mem device's requested size, as the hypervisor does; "
                                   "the driver plugs or unplugs blocks (exit 3 if a block to unplug is busy)")
    sp.add_argument("id", metavar="DEVICE", help="a virtio-mem device id (see memfs status)")
    sp.add_argument("size", metavar="SIZE", help="the new requested size, a multiple of the block size, e.g. 512M")
    sp.add_argument("--json", action="store_true", help="print the device and its blocks as JSON")

    sp = cmd("alloc", cmd_alloc, "allocate pages (pins blocks: unmovable pages make offlining fail EBUSY); "
                                 "prints the allocation id")
    kind = sp.add_mutually_exclusive_group(required=True)
    kind.add_argument("--unmovable", action="store_true", help="kernel-like memory: pins its blocks")
    kind.add_argument("--movable", action="store_true", help="user-like memory: migrates when a block goes offline")
    sp.add_argument("size", metavar="SIZE", help="e.g. 4M")
    sp.add_argument("--node", type=int, metavar="N", help="preferred node")
    sp.add_argument("--block", type=int, metavar="N", help="place it all in memory block N (must be online)")
    sp.add_argument("--json", action="store_true")

    sp = cmd("free", cmd_free, "free an allocation made with memfs alloc")
    sp.add_argument("alloc_id", type=int, metavar="ALLOC_ID")

    sp = cmd("events", cmd_events, "the uevents the machine emitted (add, remove, online, offline)")
    sp.add_argument("--since", type=int, default=0, metavar="N", help="only events with SEQNUM > N")
    sp.add_argument("--wait", type=float, default=0, metavar="S",
                    help="wait up to S seconds (at most 60) for an event after N")
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("describe", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                        help="write the machine description of this machine (or of a sysfs dump)",
                        description="Read a machine's memory sysfs, read-only, and write a machine description "
                                    "that `memfs mount MNT --config FILE` serves as the same tree: block size, "
                                    "RAM ranges, nodes, hot-plugged DIMMs, every block's state and zone, "
                                    "auto_online_blocks, memory_hotplug parameters, kernel profile. Attributes "
                                    "memfs would read differently are listed on stderr and in the file.")
    sp.set_defaults(fn=cmd_describe)
    sp.add_argument("--sysroot", default="/", metavar="DIR",
                    help="a directory holding sys/devices/system/memory (and optionally sys/devices/system/"
                         "node, sys/module/memory_hotplug, sys/firmware/memmap, proc/zoneinfo, proc/iomem, "
                         "proc/sys/kernel/{osrelease,arch}, proc/cmdline); default: this machine, /")
    sp.add_argument("-o", "--output", metavar="FILE", help="write the description to FILE (default: stdout)")
    sp.add_argument("--kernel", metavar="V",
                    help="kernel profile or release, e.g. 6.1 or 6.12.117+deb13-amd64 (default: the newest "
                         "profile not newer than the machine's release)")
    from .machine.profiles import ARCHES
    sp.add_argument("--arch", choices=list(ARCHES), metavar="ARCH",
                    help="the machine's arch and page size, for dumps without proc/sys/kernel/arch: "
                         + ", ".join(ARCHES))

    add_commands(cmd)  # sandbox hook: memfs exec / udevd / monitor (memfs/sandbox/cli.py)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    except Fail as e:
        err(str(e))
        return e.code
    except control.NotRunning as e:
        dead = FSTYPE in mounts_at(e.mnt)
        err(f"no memfs is mounted at {e.mnt}; start one with: memfs mount {e.mnt}"
            + (" (a dead memfs mount is left there: its daemon is gone; memfs mount cleans it up)"
               if dead else ""))
        return EXIT_NOT_MOUNTED
    except PermissionError as e:
        err(f"{a.mountpoint}: Permission denied on the control socket {e.filename}: it is for its owner "
            f"only by default (mode 0600); run as root, or mount with --control-mode 0666")
        return EXIT_ERROR
    except control.ControlError as e:
        err(f"{a.command}: {e.message}")
        return EXIT_BUSY if e.errno == errno.EBUSY else EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`memfs events MNT | head`): stop quietly,
        # as a command killed by SIGPIPE would, and keep the interpreter's final flush of
        # stdout from failing again (docs.python.org/3/library/signal.html, "Note on SIGPIPE")
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
